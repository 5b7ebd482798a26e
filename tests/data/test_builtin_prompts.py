"""The prompt sets shipped with the package (megatron_rlvr/data/builtin): `builtin:NAME` in a config names them,
every record is a valid open-instruct RLVR record whose ifeval ground truth parses, the verifier scores
responses that follow and break each constraint differently, and no held-out prompt or wording is trained on."""

import json
import os

import pytest

from megatron_rlvr.config import BUILTIN_DATA_DIR, load_config
from megatron_rlvr.rewards import verify
from megatron_rlvr.rewards.ifeval import parse_instructions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "smollm2-ifeval-cpu.yaml")


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_config_names_the_packaged_sets():
    cfg = load_config(CONFIG, ["model.path=/somewhere"])
    assert cfg.data.train_files == [os.path.join(BUILTIN_DATA_DIR, "ifeval-train.jsonl")]
    assert cfg.data.eval_files == [os.path.join(BUILTIN_DATA_DIR, "ifeval-heldout.jsonl")]
    for path in cfg.data.train_files + cfg.data.eval_files:
        assert os.path.isfile(path)
    assert os.path.isfile(os.path.join(BUILTIN_DATA_DIR, "LICENSE-ifeval-heldout"))


@pytest.mark.parametrize("name", ["ifeval-train.jsonl", "ifeval-heldout.jsonl"])
def test_records_are_valid(name):
    records = _records(os.path.join(BUILTIN_DATA_DIR, name))
    assert len(records) >= 90
    for record in records:
        assert record["dataset"] == "ifeval"
        assert [m["role"] for m in record["messages"]] == ["user"] and record["messages"][0]["content"]
        assert len(parse_instructions(record["ground_truth"])) == 1


def test_held_out_is_never_trained_on():
    train = _records(os.path.join(BUILTIN_DATA_DIR, "ifeval-train.jsonl"))
    held_out = _records(os.path.join(BUILTIN_DATA_DIR, "ifeval-heldout.jsonl"))
    train_prompts = {r["messages"][0]["content"] for r in train}
    train_sentences = {s.strip() for p in train_prompts for s in p.split(". ") if len(s) > 20}
    for record in held_out:
        prompt = record["messages"][0]["content"]
        assert prompt not in train_prompts
        assert not any(sentence in prompt for sentence in train_sentences), prompt


@pytest.mark.parametrize("truth,follows,breaks", [
    ({"func_name": "validate_lowercase"}, "the weather is lovely today and the garden is full of flowers.",
     "The weather is lovely today and the garden is full of flowers."),
    ({"func_name": "validate_no_commas"}, "no commas here", "one, two"),
    ({"func_name": "verify_keywords", "keyword_list": ["garden"]}, "my garden is green", "my yard is green"),
    ({"func_name": "validate_end", "end_phrase": "The end."}, "a story. The end.", "The end. a story."),
    ({"func_name": "validate_word_constraint", "N": 5, "quantifier": "at most"}, "one two three", "a b c d e f g"),
])
def test_training_constraints_score(truth, follows, breaks):
    assert verify("ifeval", follows, json.dumps(truth)) == 1.0
    assert verify("ifeval", breaks, json.dumps(truth)) == 0.0
