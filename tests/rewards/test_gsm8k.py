"""GSM8K verifier: the last number in the response against the number after `####`."""

import json
import pathlib
import re

import pytest

from megatron_rlvr.rewards import RecordError, run_verifier
from megatron_rlvr.rewards.gsm8k import gsm8k_answer, last_number

DATA = pathlib.Path(__file__).parent / "data" / "gsm8k_sample.jsonl"

# (prediction, ground truth, expected score)
CASES = {
    "plain": ("The answer is 72.", "#### 72", 1.0),
    "no_period": ("She sold 72 clips", "72", 1.0),
    "thousands_both": ("He earns 1,080 dollars.", "#### 1,080", 1.0),
    "thousands_truth_only": ("He earns 1080 dollars.", "#### 1,080", 1.0),
    "thousands_prediction_only": ("He earns 1,080 dollars.", "1080", 1.0),
    "millions": ("That is 109,200,000 people.", "#### 109,200,000", 1.0),
    "dollar_sign": ("It costs $18.", "18", 1.0),
    "latex_dollar_and_cents": ("It costs \\$18.00 in total", "#### 18", 1.0),
    "trailing_zero_decimal": ("x = 18.0", "18", 1.0),
    "decimal_truth": ("It takes 0.5 hours.", "#### 0.5", 1.0),
    "leading_dot_decimal": ("It takes .5 hours", "0.5", 1.0),
    "negative": ("The average was -7 degrees.", "#### -7", 1.0),
    "unicode_minus": ("The average was \u22127 degrees.", "-7", 1.0),
    "negative_dollars": ("She lost -$5 overall.", "-5", 1.0),
    "boxed": ("So the total is \\boxed{72}", "72", 1.0),
    "boxed_money_with_separator": ("Total: $\\boxed{\\$1,080}$.", "1,080", 1.0),
    "marker_in_response": ("48 + 24 = 72\n#### 72", "72", 1.0),
    "percent": ("The discount is 50%.", "50", 1.0),
    "unit_glued": ("The bag weighs 72kg.", "72", 1.0),
    "range_is_not_negative": ("Read pages 3-5", "5", 1.0),
    "subtraction_result": ("10 - 3 = 7", "7", 1.0),
    "multi_line_solution": ("First 48/2 = 24.\nThen 48 + 24 = 72.\nSo 72", "#### 72", 1.0),
    "plus_sign": ("A change of +5", "5", 1.0),
    "integer_ground_truth": ("The answer is 72", 72, 1.0),
    "truth_with_trailing_period": ("It is 9", "#### 9.", 1.0),
    # must score 0
    "wrong": ("The answer is 71.", "#### 72", 0.0),
    "right_number_not_last": ("72 clips in total, counted over 3 days.", "#### 72", 0.0),
    "no_number": ("I do not know.", "#### 72", 0.0),
    "empty": ("", "#### 72", 0.0),
    "decimal_mismatch": ("It is 72.5", "72", 0.0),
    "sign_mismatch": ("It is -72", "72", 0.0),
    "comma_list_not_thousands": ("The digits are 1,2345", "12345", 0.0),
    "split_digits": ("It is 7 2", "72", 0.0),
    "range_end_not_negative": ("pages 3-5", "-5", 0.0),
    "boxed_wrong": ("\\boxed{71}", "72", 0.0),
    "malformed_grouping": ("It is 1,08", "108", 0.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gsm8k_cases(name):
    prediction, truth, expected = CASES[name]
    assert run_verifier("gsm8k", prediction, truth) == expected


def test_dataset_name_is_case_insensitive():
    assert run_verifier("GSM8K", "so 4", "#### 4") == 1.0
    assert run_verifier(" Gsm8k ", "so 4", "#### 4") == 1.0


@pytest.mark.parametrize("text,value", [("a 1,234.5 b", "1234.5"), ("x=-3", "-3"), ("(4)-1", "1"), ("v 2.", "2")])
def test_last_number_values(text, value):
    assert str(last_number(text)) == value


@pytest.mark.parametrize("truth", ["#### ", "no number here", "#### 12 apples and 3", "####", [72]])
def test_malformed_ground_truth_raises(truth):
    with pytest.raises(RecordError, match="gsm8k ground truth"):
        gsm8k_answer(truth)


def _real_records():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


@pytest.mark.parametrize("index", range(5))
def test_real_gsm8k_solutions(index):
    """The reference solutions of real GSM8K records verify against their own `####` answer, with and
    without the calculator annotations; changing the final number breaks the match."""
    record = _real_records()[index]
    solution = record["answer"]
    truth_text = solution.split("####")[-1].strip()
    assert run_verifier("gsm8k", solution, solution) == 1.0
    assert run_verifier("gsm8k", solution, truth_text) == 1.0
    body = re.sub(r"<<[^>]*>>", "", solution.split("####")[0])
    assert run_verifier("gsm8k", f"{body}\nThe answer is {truth_text}.", solution) == 1.0
    wrong = gsm8k_answer(solution) + 1
    assert run_verifier("gsm8k", f"{body}\nThe answer is {wrong}.", solution) == 0.0
