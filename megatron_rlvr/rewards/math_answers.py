"""Competition math (MATH, open-instruct `dataset: math`): extract the final answer, decide equivalence.

Extraction, first that applies: the last `\\boxed{...}` or `\\fbox{...}` (nested braces; `\\boxed 5` too), else
the text after the last "final answer is", else the last `$...$` span. A response with none has no answer.

Equivalence: never when both answers state a base or a unit and these differ (`math_markers`: the checks below
drop subscripts and units); otherwise, first that says yes: the normalized strings are equal; math-verify
(`math_verify.parse` + `math_verify.verify`, the field's reference grader); a sympy comparison of the normalized answers. The sympy
pass exists because math-verify rejects a few forms graders accept (`0.\\overline{3}` vs `\\frac{1}{3}`, a
sentence-final `5.`), and it keeps working on answers whose LaTeX math-verify's extraction regexes miss.

Time limits: math-verify's own timeouts use SIGALRM, which only works on a process's main thread, so both are
switched off here (`parsing_timeout=None`, `timeout_seconds=None`) and the reward pool bounds the time instead
by running verifiers in worker processes it kills (see `megatron_rlvr.rewards.pool`).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from megatron_rlvr.rewards.math_markers import markers_conflict
from megatron_rlvr.rewards.registry import RecordError, register_verifier

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced_group(text: str, start: int) -> str | None:
    """The contents of the `{...}` group opening at `text[start]`, or None when it never closes.

    Escaped braces (`\\{`, `\\}`: literal set braces in LaTeX) do not count towards the nesting depth.
    """
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in `text`.

    Only the last box counts: when it never closes (a response cut off mid-answer) there is no boxed answer,
    rather than an earlier, intermediate one.
    """
    position = max(text.rfind(command) for command in _BOX_COMMANDS)
    if position < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, position))
    rest = position + len(command)
    argument_start = len(text) - len(text[rest:].lstrip())
    if text.startswith("{", argument_start):
        return _braced_group(text, argument_start)
    if argument_start > rest:
        # `\boxed 5`: the command applied to one space-separated token.
        return re.split(r"[\s$]", text[argument_start:], maxsplit=1)[0] or None
    return None


_DOLLARS = re.compile(r"(?<!\\)\$+")
_FINAL_ANSWER = re.compile(r"final answer is:?\s*", re.IGNORECASE)


def last_dollar_math(text: str) -> str | None:
    """The contents of the last closed `$...$` (or `$$...$$`) span; escaped `\\$` is a literal dollar sign."""
    pieces = _DOLLARS.split(text)
    # n delimiters give n + 1 pieces; math is at the odd indices, and a span is closed only if a piece follows.
    last_closed = len(pieces) - 2
    if last_closed % 2 == 0:
        last_closed -= 1
    return pieces[last_closed].strip() if last_closed >= 1 else None


def final_answer_phrase(text: str) -> str | None:
    """What follows the last "final answer is" (Minerva's format: "The final answer is $x$. I hope ...")."""
    last = None
    for last in _FINAL_ANSWER.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():]
    if rest.startswith("$"):
        return last_dollar_math(rest[:_closing_dollar_end(rest)])
    line = rest.split("\n", 1)[0]
    line = re.split(r"\.\s+I hope", line, maxsplit=1)[0]
    return line.strip().rstrip(".").strip() or None


def _closing_dollar_end(text: str) -> int:
    """Index just past the `$...$` span that `text` opens with (the whole text if it never closes)."""
    opening = _DOLLARS.match(text)
    closing = _DOLLARS.search(text, opening.end())
    return closing.end() if closing else len(text)


def extract_math_answer(response: str) -> str | None:
    """The final answer of a math response (see the module docstring for the order of the forms)."""
    for extractor in (last_boxed, final_answer_phrase, last_dollar_math):
        answer = extractor(response)
        if answer:
            return answer.strip()
    return None


# ---------------------------------------------------------------------------------------------------------------
# Normalization shared by the string and sympy comparisons.

_TEXT_COMMANDS = r"\\(?:text|textbf|textrm|textit|mbox|mathrm|mathbf|operatorname)"
_WHOLE_TEXT = re.compile(rf"^{_TEXT_COMMANDS}\{{([^{{}}]*)\}}$")
# A unit: a text command holding only words, right after a number, a closing brace or another unit.
_UNIT = re.compile(rf"(?<=[\d}}\s])\s*{_TEXT_COMMANDS}\{{\s*[A-Za-z][A-Za-z\s.]*\}}(?:\^\{{?\d\}}?)?")
_TEXT_WRAPPER = re.compile(rf"{_TEXT_COMMANDS}\{{([^{{}}]*)\}}")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=[^=]+$)")
_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# Brace-less arguments (`\frac12`, `\frac{a}2`, `\sqrt3`): valid TeX that the LaTeX parser rejects.
_BARE_FRAC = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d)")
_BARE_FRAC_FIRST = re.compile(r"\\frac\s*(\d)\s*(\{)")
_BARE_SQRT = re.compile(r"\\sqrt\s*(\d|[A-Za-z](?![A-Za-z]))")
_DROPPED = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^{\\circ}", "^\\circ", "\\circ", "\u00b0",
    "\\%", "%", "\\$", "$", "\\displaystyle",
)


def _repeating_to_fraction(match: re.Match) -> str:
    """`a.b\\overline{c}` -> the exact fraction, e.g. `0.\\overline{3}` -> `\\frac{1}{3}`."""
    sign, whole, fixed, repeat = match.groups()
    numerator = int(whole + fixed + repeat or "0") - int(whole + fixed or "0")
    denominator = (10 ** len(repeat) - 1) * 10 ** len(fixed)
    return f"{sign}\\frac{{{numerator}}}{{{denominator}}}"


def _braced(argument: str) -> str:
    return argument if argument.startswith("{") else f"{{{argument}}}"


def normalize_answer(answer: str) -> str:
    """A canonical spelling of a final answer: `\\dfrac`->`\\frac`, units and `\\text{}` wrappers, sizing and
    spacing commands, degree/percent/dollar signs, a leading `x =`, thousands separators, a trailing period
    removed, repeating decimals as fractions; a whole-`\\text{}` answer is its lowercased words."""
    text = answer.strip()
    whole_text = _WHOLE_TEXT.match(text)
    if whole_text:
        return " ".join(whole_text.group(1).lower().split())
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _BARE_FRAC.sub(lambda m: f"\\frac{_braced(m[1])}{{{m[2]}}}", text)
    text = _BARE_FRAC_FIRST.sub(r"\\frac{\1}\2", text)
    text = _BARE_SQRT.sub(r"\\sqrt{\1}", text)
    text = _UNIT.sub("", text)
    text = _TEXT_WRAPPER.sub(r"\1", text)
    for token in _DROPPED:
        text = text.replace(token, "")
    text = " ".join(text.split()).rstrip(".").strip()
    text = _ASSIGNMENT.sub("", text)
    text = _REPEATING.sub(_repeating_to_fraction, text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return text


# ---------------------------------------------------------------------------------------------------------------
# The sympy comparison.

_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_DECIMAL_RTOL = 1e-6  # the precision math-verify compares floats at (float_rounding=6)
_EXACT_RTOL = 1e-20


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside (), [] or {} (escaped `\\{`/`\\}` count as brackets)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items


def _structure(answer: str) -> tuple[str, list[str]]:
    """(kind, items): kind is `set` (`\\{..\\}` or a bare comma list: order-free), a bracket pair such as `()`,
    `[)` or `[]` (tuples and intervals: ordered, brackets must match), or `scalar`."""
    if answer.startswith("\\{") and answer.endswith("\\}"):
        return "set", _split_top_level(answer[2:-2])
    if len(answer) >= 2 and answer[0] in "([" and answer[-1] in ")]":
        inner = _split_top_level(answer[1:-1])
        if len(inner) >= 2:
            return answer[0] + answer[-1], inner
    items = _split_top_level(answer)
    return ("set", items) if len(items) >= 2 else ("scalar", [answer])


@functools.lru_cache(maxsize=4096)
def _to_sympy(latex: str):
    from latex2sympy2_extended import latex2sympy

    return latex2sympy(latex)


def scalars_equal(first: str, second: str) -> bool:
    """Whether two single LaTeX expressions are equal: structurally; symbolically (`simplify(a - b) == 0`) when
    they have free symbols; exactly when both are rational numbers; otherwise numerically, to 1e-6 relative when
    either holds a written decimal and to 1e-20 when both are exact. Unparsable LaTeX is equal to nothing."""
    if first == second:
        return True
    try:
        return _sympy_scalars_equal(_to_sympy(first), _to_sympy(second))
    except Exception:  # latex2sympy raises bare Exceptions on malformed LaTeX; sympy raises many kinds
        return False


def _sympy_scalars_equal(a, b) -> bool:
    import sympy

    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return a == b
    if a == b:
        return True
    if a.is_infinite or b.is_infinite:
        return False
    if a.free_symbols or b.free_symbols:
        return sympy.simplify(a - b) == 0
    if a.is_Rational and b.is_Rational:
        return False  # exact numbers that differ, however little: 1000001 is not 1000000
    # A written decimal is an approximation, compared at math-verify's precision; exact irrationals
    # (2\sqrt{2} vs \sqrt{8}) must agree to the precision of a 30-digit evaluation.
    rtol = _DECIMAL_RTOL if a.has(sympy.Float) or b.has(sympy.Float) else _EXACT_RTOL
    value_a, value_b = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
    return abs(value_a - value_b) <= rtol * max(1.0, abs(value_b))


def sympy_equal(first: str, second: str) -> bool:
    """Equivalence of two answers by structure, then `scalars_equal` item by item: tuples and intervals in
    order with the same brackets, sets in any order, after `normalize_answer` on both."""
    first, second = normalize_answer(first), normalize_answer(second)
    kind_a, items_a = _structure(first)
    kind_b, items_b = _structure(second)
    if kind_a != kind_b or len(items_a) != len(items_b):
        return False
    if kind_a != "set":
        return all(scalars_equal(a, b) for a, b in zip(items_a, items_b))
    unmatched = list(items_b)
    for item in items_a:
        match = next((j for j, other in enumerate(unmatched) if scalars_equal(item, other)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return True


# ---------------------------------------------------------------------------------------------------------------
# math-verify.


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here they are off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise ImportError("the math verifier needs math-verify: pip install math-verify "
                          "(it is in megatron-rlvr's cpu and gpu extras)") from err
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    return math_verify


def math_verify_equal(answer: str, gold: str) -> bool:
    """math-verify's verdict on two extracted answers, with its signal-based timeouts off (see module doc)."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    parsed_gold = mv.parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=None)
    parsed_answer = mv.parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=None)
    if not parsed_gold or not parsed_answer:
        return False
    return bool(mv.verify(parsed_gold, parsed_answer, timeout_seconds=None))


def math_equal(answer: str, gold: str) -> bool:
    """Whether an extracted answer is mathematically equivalent to the reference (module docstring)."""
    if markers_conflict(answer, gold):
        return False
    return (
        normalize_answer(answer) == normalize_answer(gold)
        or math_verify_equal(answer, gold)
        or sympy_equal(answer, gold)
    )


@register_verifier("math")
def verify_math(prediction: str, ground_truth: Any) -> float:
    """1.0 when the response's final answer is equivalent to the reference LaTeX answer, else 0.0."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise RecordError(f"math ground truth must be a non-empty LaTeX string, got {ground_truth!r}")
    gold = last_boxed(ground_truth) or ground_truth.strip()
    answer = extract_math_answer(prediction)
    return float(answer is not None and math_equal(answer, gold))
