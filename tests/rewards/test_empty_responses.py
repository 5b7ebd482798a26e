"""An empty or whitespace-only response never scores above 0, for any verifier: the rule lives in one place
(`run_verifier`), so it holds for the built-in verifiers, for registered ones and through the reward pool."""

import json

import pytest

from megatron_rlvr.rewards import RewardPool, known_datasets, run_verifier
from tests.rewards import misbehaving_verifiers  # noqa: F401 - registers test_misbehaving in this process

EMPTY_RESPONSES = ["", " ", "\n\n", "\t \r\n"]

# A ground truth per built-in dataset that an empty answer would satisfy if nothing stopped it.
GROUND_TRUTHS = {
    "gsm8k": "#### 0",
    "math": "0",
    "ifeval": json.dumps({"func_name": "validate_no_commas"}),
    "ifeval_old": json.dumps({"func_name": "validate_forbidden_words", "forbidden_words": ["rude"]}),
}


def test_every_built_in_dataset_is_covered():
    assert set(GROUND_TRUTHS) == set(known_datasets()) - {"test_misbehaving"}


@pytest.mark.parametrize("response", EMPTY_RESPONSES)
@pytest.mark.parametrize("dataset", sorted(GROUND_TRUTHS))
def test_empty_response_scores_zero(dataset, response):
    assert run_verifier(dataset, response, GROUND_TRUTHS[dataset]) == 0.0


@pytest.mark.parametrize("response", EMPTY_RESPONSES)
def test_a_registered_verifier_that_accepts_empty_text_is_overruled(response):
    # test_misbehaving scores exact string equality: the empty response equals its empty ground truth.
    assert run_verifier("test_misbehaving", response, response) == 0.0
    assert run_verifier("test_misbehaving", "x", "x") == 1.0


def test_empty_responses_through_the_pool():
    records = [(dataset, response, GROUND_TRUTHS[dataset]) for dataset in GROUND_TRUTHS for response in ("", "  ")]
    records.append(("test_misbehaving", " ", " "))
    with RewardPool(workers=1, timeout=60, verifier_modules=["tests.rewards.misbehaving_verifiers"]) as pool:
        assert pool.score(records) == [0.0] * len(records)
