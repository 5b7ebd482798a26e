"""Bad inputs caught before any process group or model exists, each named with its file (and line) and the fix:
records whose `dataset` has no verifier (the registry decides), malformed JSON, empty files, prompts that all
exceed the length limit, `data.on_malformed=skip`, damaged model files; and through `megatron-rlvr train`, exit
status 2 with that message and no process group ever created."""

import json
import logging

import pytest
import torch.distributed as dist

from megatron_rlvr.config import config_from_dict
from megatron_rlvr.models.tiny import build_char_tokenizer, save_tiny_llama
from megatron_rlvr.preflight import InputError, check_model_files, load_prompt_sets
from megatron_rlvr.rewards.registry import known_datasets

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}], "ground_truth": "4", "dataset": "gsm8k"}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _cfg(train, **extra):
    return config_from_dict({}, [f"data.train_files=[{train}]", "model.path=unused", "data.max_prompt_length=64",
                                 *[f"{k}={v}" for k, v in extra.items()]])


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_unknown_dataset_named_with_file_line_and_the_registry(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", [GOOD, dict(GOOD, dataset="humaneval"), GOOD])
    with pytest.raises(InputError) as err:
        load_prompt_sets(_cfg(train), tokenizer)
    message = str(err.value)
    assert f"{train}:line 2" in message and "'humaneval'" in message
    assert all(name in message for name in known_datasets()), message
    assert "data.on_malformed=skip" in message


def test_skip_drops_malformed_rows_with_their_line(tmp_path, tokenizer, caplog):
    train = _write(tmp_path / "train.jsonl", [GOOD, "{not json", dict(GOOD, dataset="nope"), GOOD])
    with caplog.at_level(logging.WARNING):
        prompts, held_out = load_prompt_sets(_cfg(train, **{"data.on_malformed": "skip"}), tokenizer)
    assert len(prompts) == 2 and held_out is None
    assert f"{train}:line 2: invalid JSON" in caplog.text and f"{train}:line 3" in caplog.text


def test_malformed_json_named(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", [GOOD, '{"messages": [', GOOD])
    with pytest.raises(InputError, match=rf"{train}:line 2: invalid JSON"):
        load_prompt_sets(_cfg(train), tokenizer)


def test_empty_file_named(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", [GOOD])
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=rf"data.eval_files: {empty}: the data file holds no records"):
        load_prompt_sets(_cfg(train, **{"data.eval_files": f"[{empty}]"}), tokenizer)


def test_every_prompt_too_long_names_the_file(tmp_path, tokenizer):
    long = dict(GOOD, messages=[{"role": "user", "content": "x" * 500}])
    train = _write(tmp_path / "train.jsonl", [long, long])
    with pytest.raises(InputError, match=rf"no prompt is left: all 2 are longer than max_prompt_length=64 tokens "
                                         rf"\({train}\)"):
        load_prompt_sets(_cfg(train), tokenizer)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_model_files_named(tmp_path, damage):
    model = tmp_path / "model"
    save_tiny_llama(str(model))
    check_model_files(str(model))  # intact: passes
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(InputError, match=rf"model.path: {weights} is not a readable safetensors file"):
        check_model_files(str(model))
    (model / "config.json").write_text("{")
    with pytest.raises(InputError, match=rf"{model / 'config.json'} cannot be read"):
        check_model_files(str(model))


def test_train_command_stops_before_any_process_group(tmp_path, monkeypatch, capsys):
    from megatron_rlvr.cli import main

    # a world of one, as `single_process_env` would set it, restored after the test
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(key, value)
    model = tmp_path / "model"
    save_tiny_llama(str(model))
    train = _write(tmp_path / "train.jsonl", [GOOD] * 3 + [dict(GOOD, dataset="gsm9k")])
    status = main(["train", f"model.path={model}", f"data.train_files=[{train}]", f"output_dir={tmp_path / 'out'}",
                   "model.pad_vocab_multiple=8", "metrics.tensorboard=false"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"input error: data.train_files: {train}:line 4" in err and "'gsm9k'" in err, err
    assert not dist.is_initialized()
