"""HF <-> megatron checkpoint conversion: bit-exact round trips through TP/PP, reshards, and clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rlvr.models import convert
from megatron_rlvr.models.weights import read_hf_state
from tests.models.common import tiny_model_dir


def _assert_bit_exact(a_dir, b_dir):
    a, b = read_hf_state(a_dir), read_hf_state(b_dir)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{name} differs"


def test_hf_mcore_tp2_pp2_hf_bit_exact(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny-tied")  # 4 layers: PP=2 splits them, tied embeddings
    convert.hf_to_mcore(src, str(tmp_path / "mc"), tp=2, pp=2)
    convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"))
    _assert_bit_exact(src, str(tmp_path / "back"))
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 4
    assert os.path.isfile(tmp_path / "back" / "tokenizer.json")


def test_reshard_tp2_to_tp1_pp2_bit_exact(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=4)
    convert.hf_to_mcore(src, str(tmp_path / "tp2"), tp=2, pp=1)
    convert.reshard(str(tmp_path / "tp2"), str(tmp_path / "pp2"), tp=1, pp=2)
    assert convert.read_metadata(str(tmp_path / "pp2"))["saved_pp"] == 2
    convert.mcore_to_hf(str(tmp_path / "pp2"), str(tmp_path / "back"))
    _assert_bit_exact(src, str(tmp_path / "back"))


def test_bf16_weights_stay_bf16(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny")
    state = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    convert.hf_to_mcore(src, str(tmp_path / "mc"), tp=2, pp=1)
    convert.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"))
    _assert_bit_exact(src, str(tmp_path / "back"))


def test_missing_tensor_is_named_and_no_output_left(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny")
    state = load_file(os.path.join(src, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert.hf_to_mcore(src, str(tmp_path / "out"), tp=2)
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp-")]


def test_wrong_shape_is_named(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny")
    state = load_file(os.path.join(src, "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \[3, 64\]"):
        convert.hf_to_mcore(src, str(tmp_path / "out"))


def test_config_errors(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny")
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not divide num_attention_heads=4"):
        convert.hf_to_mcore(src, str(tmp_path / "out"), tp=3)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["MistralForCausalLM"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"architecture 'MistralForCausalLM' is not supported"):
        convert.hf_to_mcore(src, str(tmp_path / "out"))


def test_cli_failed_conversion_leaves_nothing(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny")
    out = tmp_path / "cli-out"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rlvr.cli", "convert", "--from", "hf", "--to", "mcore", "--tp", "3",
         src, str(out)], capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "does not divide num_attention_heads" in proc.stderr
    assert not out.exists()


def test_uneven_pipeline_round_trip_bit_exact(tmp_path):
    """HF -> PP 3 split 2 | 3 | 2 -> TP 2 -> HF, and the split is recorded with the checkpoint."""
    src = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=7)
    convert.hf_to_mcore(src, str(tmp_path / "pp3"), tp=1, pp=3, first_stage_layers=2, last_stage_layers=2)
    assert convert.read_metadata(str(tmp_path / "pp3"))["saved_stage_layers"] == [2, 3, 2]
    convert.reshard(str(tmp_path / "pp3"), str(tmp_path / "tp2"), tp=2, pp=1)
    convert.mcore_to_hf(str(tmp_path / "tp2"), str(tmp_path / "back"))
    _assert_bit_exact(src, str(tmp_path / "back"))


def test_cli_uneven_pipeline_split(tmp_path):
    """`megatron-rlvr convert --pp-first-layers/--pp-last-layers` writes the split it was given."""
    src = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=7)
    out = tmp_path / "cli-pp3"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rlvr.cli", "convert", "--from", "hf", "--to", "mcore", "--pp", "3",
         "--pp-first-layers", "1", "--pp-last-layers", "1", src, str(out)], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert convert.read_metadata(str(out))["saved_stage_layers"] == [1, 5, 1]


def test_impossible_pipeline_split_is_refused(tmp_path):
    src = tiny_model_dir(tmp_path, "tiny", num_hidden_layers=7)
    with pytest.raises(ValueError, match=r"first=2 leaves 5 layer\(s\) for 2 other stage\(s\).*first = last in \[1, 2, 3\]"):
        convert.hf_to_mcore(src, str(tmp_path / "out"), pp=3, first_stage_layers=2)
    assert not os.path.exists(tmp_path / "out")
