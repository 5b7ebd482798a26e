"""MATH answers keep what changes their value: a regression table of base-n numerals, units, interval ends and
`\\pm`, each scored through the math verifier (`\\boxed{answer}` against the reference answer)."""

import pytest

from megatron_rlvr.rewards import run_verifier
from megatron_rlvr.rewards.math_markers import base_of, unit_of

# (answer in the response's box, reference answer, equivalent?)
VALUE_TABLE = [
    # Bases: the subscript is part of the value; leaving it out is the number written in the base asked for.
    ("4210_{5}", "4210_{5}", True),
    ("4210_5", "4210_{5}", True),
    ("4210", "4210_{5}", True),
    ("4210_{7}", "4210_{5}", False),
    ("4210_{5}", "4210_{7}", False),
    ("10101_{3}", "10101_{2}", False),
    ("1011_2", "1011_{2}", True),
    ("1AB_{12}", "1AB_{12}", True),
    ("1AB_{16}", "1AB_{12}", False),
    ("555", "4210_{5}", False),
    # Units: a different unit is a different value; a bare number is in the unit the problem asked for.
    ("5\\text{ cm}", "5\\text{ cm}", True),
    ("5\\text{ centimeters}", "5\\text{ cm}", True),
    ("5", "5\\text{ cm}", True),
    ("5\\text{ m}", "5\\text{ cm}", False),
    ("5\\text{ inches}", "5\\text{ feet}", False),
    ("12\\text{ cm}^2", "12\\text{ cm}^2", True),
    ("12\\text{ square centimeters}", "12\\text{ cm}^2", True),
    ("12\\text{ m}^2", "12\\text{ cm}^2", False),
    ("12\\text{ cm}", "12\\text{ cm}^2", False),
    ("2\\text{ hours}", "120\\text{ minutes}", False),
    ("40\\text{ mph}", "40\\text{ mph}", True),
    ("7\\text{ apples}", "7", True),
    # Intervals: open and closed ends.
    ("[1, 3)", "[1, 3)", True),
    ("(1, 3]", "[1, 3)", False),
    ("(1, 2]", "[1, 2]", False),
    ("(1,2)", "[1,2]", False),
    ("(-\\infty, 3]", "(-\\infty, 3)", False),
    ("(-\\infty,3]", "(-\\infty, 3]", True),
    ("(0,1)\\cup(2,3]", "(0,1)\\cup(2,3)", False),
    # \pm: both signs, not one of them.
    ("1\\pm\\sqrt{2}", "1\\pm\\sqrt{2}", True),
    ("1+\\sqrt{2}", "1\\pm\\sqrt{2}", False),
    ("1-\\sqrt{2}", "1\\pm\\sqrt{2}", False),
    ("\\pm 3", "\\pm3", True),
    ("3", "\\pm 3", False),
    ("1\\pm\\sqrt{2}", "1+\\sqrt{2}", False),
]


@pytest.mark.parametrize("answer,gold,equal", VALUE_TABLE, ids=[f"{a} vs {g}" for a, g, _ in VALUE_TABLE])
def test_value_changing_parts_are_kept(answer, gold, equal):
    response = f"Working through the problem gives $\\boxed{{{answer}}}$."
    assert run_verifier("math", response, gold) == float(equal)


@pytest.mark.parametrize("answer,base", [("4210_{5}", "5"), ("4210_5", "5"), ("{1AB}_{12}", "12"), ("4210", None),
                                         ("x^2", None), ("4210_{5}.", "5")])
def test_base_of(answer, base):
    assert base_of(answer) == base


@pytest.mark.parametrize("answer,unit", [("5\\text{ cm}", ("cm", 1)), ("5 \\mbox{ Inches}", ("in", 1)),
                                         ("9\\text{ cubic feet}", ("ft", 3)), ("3\\text{ units}^2", ("unit", 2)),
                                         ("3\\text{ ways}", None), ("\\frac{1}{2}", None)])
def test_unit_of(answer, unit):
    assert unit_of(answer) == unit
