"""The `dpo` command's config surface: --help, --list-keys, --dry-run of the shipped configs (Tülu 3's 8B, 70B, 405B
and the CPU demo), errors that name the key, and the preference-record checks."""

import json
import os

import pytest

from megatron_rlvr.cli import main
from megatron_rlvr.config import ConfigError
from megatron_rlvr.dpo.config import load_dpo_config, validate_dpo
from megatron_rlvr.models.tiny import build_char_tokenizer, save_tiny_llama

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs")


def test_help_and_list_keys(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    assert "--make-pairs" in capsys.readouterr().out
    assert main(["dpo", "--list-keys"]) == 0
    keys = capsys.readouterr().out
    for key in ("loss.name", "loss.beta", "loss.label_smoothing", "loss.reference", "train.optimizer.schedule",
                "train.optimizer.warmup_ratio", "pairs.samples_per_prompt", "data.eval_files"):
        assert f"\n{key} (" in "\n" + keys, key


@pytest.mark.parametrize("name,world,layout", [
    ("llama-8b-tulu3-dpo.yaml", 8, "TP 2 x PP 1 x DP 4"),
    ("llama-70b-tulu3-dpo.yaml", 64, "TP 8 x PP 2 x DP 4"),
    ("llama-405b-tulu3-dpo.yaml", 256, "TP 8 x PP 8 x DP 4"),
])
def test_tulu3_configs_dry_run(capsys, name, world, layout):
    assert main(["dpo", "--config", os.path.join(CONFIGS, name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"config valid for a world of {world} ranks" in out
    assert layout in out
    assert "loss dpo_norm, beta 5" in out and "then linear to 0" in out


def test_demo_config_validates(tmp_path):
    from megatron_rlvr.demo.task import write_task

    paths = write_task(str(tmp_path / "data"), num_train=8, num_eval=4)
    save_tiny_llama(str(tmp_path / "model"), "demo", seed=0)
    cfg = load_dpo_config(os.path.join(CONFIGS, "demo-dpo.yaml"), [
        f"model.path={tmp_path / 'model'}", f"data.train_files=[{paths['dpo']}]",
        f"data.eval_files=[{paths['dpo_eval']}]"])
    assert validate_dpo(cfg, 2) == []
    with pytest.raises(ConfigError, match="train.batch_size=64 must be a multiple of the data-parallel size 3"):
        validate_dpo(cfg, 3)


@pytest.mark.parametrize("override,match", [
    ("loss.name=kto", "loss.name='kto' is not registered; known: dpo_norm, ipo, sigmoid, simpo"),
    ("loss.reference=sometimes", "loss.reference='sometimes' is not one of cached, on_the_fly"),
    ("train.optimizer.schedule=step", "train.optimizer.schedule='step' is not one of constant, linear, cosine"),
    ("loss.lable_smoothing=0.1", "did you mean loss.label_smoothing"),
])
def test_errors_name_the_key(capsys, override, match):
    code = main(["dpo", "--config", os.path.join(CONFIGS, "llama-8b-tulu3-dpo.yaml"), "--dry-run", override])
    assert code == 2
    assert match in capsys.readouterr().err


def test_malformed_records_name_file_and_line(tmp_path):
    from megatron_rlvr.dpo.data import load_pairs

    prompt = [{"role": "user", "content": "2+2?"}]
    good = {"chosen": prompt + [{"role": "assistant", "content": "4"}],
            "rejected": prompt + [{"role": "assistant", "content": "5"}]}
    other = {"chosen": good["chosen"], "rejected": [{"role": "user", "content": "3+3?"}, good["rejected"][-1]]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(other) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:line 3: 'chosen' and 'rejected' must share the prompt"):
        load_pairs([str(path)], build_char_tokenizer(), None, 64)
    path.write_text(json.dumps(good) + "\n")
    (pair,) = load_pairs([str(path)], build_char_tokenizer(), None, 64)
    tokenizer = build_char_tokenizer()
    assert pair.chosen == tuple(tokenizer("4", add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    with pytest.raises(ValueError, match="no preference pair of at most 4 tokens"):
        load_pairs([str(path)], tokenizer, None, 4)
