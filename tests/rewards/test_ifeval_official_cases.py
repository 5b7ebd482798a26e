"""The ifeval verifier against IFEval's official verdicts: for each of the 25 instruction types, a few dozen
responses to real IFEval prompts (tests/rewards/data, Apache-2.0, see NOTICE), passing and failing, each with
the verdict of Google's reference checker (strict). Every case goes through `run_verifier` in the instruction-list
format with the prompt's own arguments."""

import collections
import json
from pathlib import Path

import pytest

from megatron_rlvr.rewards import run_verifier
from megatron_rlvr.rewards.ifeval_instructions import INSTRUCTIONS

DATA = Path(__file__).parent / "data"
PROMPTS = {row["key"]: row for row in map(json.loads, (DATA / "ifeval_prompts.jsonl").open(encoding="utf-8"))}
CASES = collections.defaultdict(list)
for case in map(json.loads, (DATA / "ifeval_cases.jsonl").open(encoding="utf-8")):
    CASES[case["instruction_id"]].append(case)


def test_cases_cover_every_instruction_type_both_ways():
    assert set(CASES) == set(INSTRUCTIONS.names())
    for instruction_id, cases in CASES.items():
        verdicts = collections.Counter(case["followed"] for case in cases)
        assert len(cases) >= 30 and verdicts[True] >= 5 and verdicts[False] >= 5, (instruction_id, verdicts)


def test_cases_use_the_official_prompts_arguments():
    for cases in CASES.values():
        for case in cases:
            prompt = PROMPTS[case["key"]]
            official = [{k: v for k, v in kwargs.items() if v is not None}
                        for instruction_id, kwargs in zip(prompt["instruction_id_list"], prompt["kwargs"])
                        if instruction_id == case["instruction_id"]]
            assert case["kwargs"] in official


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_official_verdicts(instruction_id):
    wrong = []
    for case in CASES[instruction_id]:
        truth = [{"instruction_id": [instruction_id], "kwargs": [case["kwargs"]]}]
        score = run_verifier("ifeval", case["response"], truth)
        if score != float(case["followed"]):
            wrong.append(f"prompt {case['key']} ({case['note']}): official {case['followed']}, got {score}")
    assert not wrong, "\n".join(wrong)


def test_prompt_scores_are_the_fraction_followed():
    """Whole prompts: the score is the share of the prompt's instructions followed, in either format's string."""
    prompt = PROMPTS[1000]  # no commas, at least 3 highlighted sections, at least 300 words
    assert prompt["instruction_id_list"] == ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                             "length_constraints:number_words"]
    truth = json.dumps([{"instruction_id": prompt["instruction_id_list"], "kwargs": prompt["kwargs"]}])
    long_text = " ".join(["word"] * 320)
    assert run_verifier("ifeval", long_text + " *one* *two* *three*", truth) == 1.0
    assert run_verifier("ifeval", long_text + ", *one* *two*", truth) == pytest.approx(1 / 3)
