"""GSM8K: the last number in the response, compared numerically with the number after `####`.

Numbers are read as written in prose and LaTeX: thousands separators (`1,234`), signs (`-5`, `−5`), decimals
(`3.50`, `.5`), currency (`$18`, `\\$18`, `-$5`), a sentence-ending period (`18.`) and `\\boxed{18}` all give the
number itself. Equality is exact on the decimal value (`18` == `18.0` == `18.00`), never on the string.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from megatron_rlvr.rewards.registry import RecordError, register_verifier

# A sign counts only when it is glued to the number and not preceded by a word or a closing bracket, so the
# ranges and subtractions of worked solutions ("pages 3-5", "(4)-1") do not turn into negative numbers.
# A comma group needs exactly three digits after each comma and none after the last, so "1,234" is one
# number while the list "1,2345" is two.
_NUMBER = re.compile(
    r"""
    (?P<sign>(?<![\w)\]}])[-+\u2212])?
    (?:\\?\$)?
    (?P<body>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)
    """,
    re.VERBOSE,
)


def parse_number(match: re.Match) -> Decimal:
    sign = -1 if match["sign"] in ("-", "\u2212") else 1
    return sign * Decimal(match["body"].replace(",", ""))


def last_number(text: str) -> Decimal | None:
    """The value of the last number written in `text`, or None when there is none."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else parse_number(last)


def gsm8k_answer(ground_truth: Any) -> Decimal:
    """The reference number: what follows the last `####` in a GSM8K solution, or the whole string if it is
    just a number."""
    if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool):
        return Decimal(str(ground_truth))
    if not isinstance(ground_truth, str):
        raise RecordError(f"gsm8k ground truth must be a string, got {type(ground_truth).__name__}")
    marker = ground_truth.rfind("####")
    tail = (ground_truth[marker + 4:] if marker >= 0 else ground_truth).strip()
    match = _NUMBER.match(tail)
    if match is None or tail[match.end():].strip(" .") != "":
        where = "after '####'" if marker >= 0 else "(no '####' marker, so the whole string must be a number)"
        raise RecordError(f"gsm8k ground truth {ground_truth[-200:]!r} has no single number {where}")
    try:
        return parse_number(match)
    except InvalidOperation as err:  # pragma: no cover - the regex admits only decimal literals
        raise RecordError(f"gsm8k ground truth {tail!r} is not a decimal number") from err


@register_verifier("gsm8k")
def verify_gsm8k(prediction: str, ground_truth: Any) -> float:
    """1.0 when the last number in `prediction` equals the ground-truth number exactly, else 0.0."""
    expected = gsm8k_answer(ground_truth)
    answer = last_number(prediction)
    return float(answer is not None and answer == expected)
