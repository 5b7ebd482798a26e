"""MATH verifier: answer extraction, normalization, math-verify equivalence and the sympy fallback."""

import pytest

from megatron_rlvr.rewards import RecordError, run_verifier
from megatron_rlvr.rewards.math_answers import (
    extract_math_answer,
    math_verify_equal,
    normalize_answer,
    sympy_equal,
)

# (response, ground truth, expected score)
CASES = {
    "boxed_fraction": ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1.0),
    "dfrac_vs_shorthand": ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    "decimal_vs_fraction": ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    "unreduced_fraction": ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
    "slash_fraction": ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    "radicals": ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    "nested_braces": ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    "pi": ("\\boxed{2\\pi}", "2 \\pi", 1.0),
    "half_open_interval": ("\\boxed{[1, 3)}", "[1,3)", 1.0),
    "infinite_interval": ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", 1.0),
    "set_any_order": ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", 1.0),
    "tuple": ("\\boxed{(3, -1)}", "(3,-1)", 1.0),
    "matrix": ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    "units_text_stripped": ("\\boxed{5\\text{ cm}}", "5", 1.0),
    "assignment_in_answer": ("\\boxed{x = 3}", "3", 1.0),
    "assignment_in_truth": ("\\boxed{3}", "x=3", 1.0),
    "percent": ("\\boxed{10\\%}", "10", 1.0),
    "degrees": ("\\boxed{90^\\circ}", "90", 1.0),
    "dollars": ("\\boxed{\\$5.00}", "5", 1.0),
    "thousands_separator": ("\\boxed{1,000}", "1000", 1.0),
    "text_answer": ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0),
    "polynomial": ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    "fbox": ("\\fbox{7}", "7", 1.0),
    "boxed_without_braces": ("so \\boxed 5", "5", 1.0),
    "last_box_counts": ("first \\boxed{1}, then correcting: \\boxed{2}", "2", 1.0),
    "final_answer_form": ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", 1.0),
    "last_dollar_math": ("We try $x = 2$, which fails, so $x = 12$.", "12", 1.0),
    "boxed_ground_truth": ("\\boxed{5}", "\\boxed{5}", 1.0),
    "repeating_decimal_fallback": ("\\boxed{0.\\overline{3}}", "\\frac{1}{3}", 1.0),
    "trailing_period_in_box": ("\\boxed{5.}", "5", 1.0),
    # must score 0
    "wrong_number": ("\\boxed{3}", "4", 0.0),
    "large_integers_differ_by_one": ("\\boxed{1000001}", "1000000", 0.0),
    "closed_vs_half_open": ("\\boxed{[1,3]}", "[1,3)", 0.0),
    "tuple_order": ("\\boxed{(2,1)}", "(1,2)", 0.0),
    "rounded_decimal": ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),
    "wrong_exponent": ("\\boxed{x^2}", "x^3", 0.0),
    "wrong_radical": ("\\boxed{\\sqrt{2}}", "2", 0.0),
    "sign": ("\\boxed{-\\infty}", "\\infty", 0.0),
    "earlier_box_right": ("\\boxed{5} no wait \\boxed{6}", "5", 0.0),
    "unclosed_box": ("the answer is \\boxed{\\frac{1}{", "1", 0.0),
    "unparsable_latex": ("\\boxed{\\frac{1}{}}", "1", 0.0),
    "garbage_latex": ("\\boxed{)(}", "1", 0.0),
    "no_answer": ("I think it is hard.", "1", 0.0),
    "empty_box": ("\\boxed{}", "0", 0.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_math_cases(name):
    response, truth, expected = CASES[name]
    assert run_verifier("math", response, truth) == expected


def test_fallback_cases_are_ones_math_verify_rejects():
    """The two fallback cases above exist because math-verify alone says no to them."""
    assert not math_verify_equal("0.\\overline{3}", "\\frac{1}{3}")
    assert not math_verify_equal("5.", "5")


@pytest.mark.parametrize(
    "response,answer",
    [
        ("a $\\boxed{\\{1,2\\}}$ b", "\\{1,2\\}"),
        ("\\boxed{\\frac{a}{\\sqrt{b}}} end", "\\frac{a}{\\sqrt{b}}"),
        ("x \\boxed{1} y \\fbox{2} z", "2"),
        ("Final answer is 12 apples.\nmore text", "12 apples"),
        ("The final answer is $x^2$. I hope it is correct.", "x^2"),
        ("$$\\sqrt{2}$$", "\\sqrt{2}"),
        ("costs \\$5 and \\$6", None),
        ("unclosed $x", None),
        ("nothing", None),
    ],
)
def test_extraction(response, answer):
    assert extract_math_answer(response) == answer


@pytest.mark.parametrize(
    "raw,normalized",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("5\\text{ cm}^2", "5"),
        ("\\text{Monday}", "monday"),
        ("x = 3", "3"),
        ("0.\\overline{3}", "\\frac{3}{9}"),
        ("1.2\\overline{34}", "\\frac{1222}{990}"),
        ("1,000", "1000"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("30^\\circ", "30"),
        ("\\$5.00", "5.00"),
        ("5.", "5"),
    ],
)
def test_normalize(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    "first,second,equal",
    [
        ("\\frac{1}{2}", "\\frac{2}{4}", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("\\frac12", "0.5", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt3", True),
        ("\\pi", "3.14159265", True),
        ("[1,3)", "[1, 3)", True),
        ("(-\\infty, 2]", "(-\\infty,2]", True),
        ("\\{1,2\\}", "\\{2, 1\\}", True),
        ("(1, \\frac{1}{2})", "(1, 0.5)", True),
        ("5\\text{ cm}", "5", True),
        ("\\text{Monday}", "\\text{monday}", True),
        ("x=3", "3", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("0.\\overline{3}", "\\frac13", True),
        ("[1,3)", "[1,3]", False),
        ("(1,2)", "(2,1)", False),
        ("(1,2)", "1, 2", False),
        ("\\{1,2\\}", "\\{1,3\\}", False),
        ("\\frac{1}{3}", "0.333", False),
        ("1000001", "1000000", False),
        ("\\sqrt{2}", "1.41421356237", True),
        ("\\sqrt{2}", "\\frac{141421356237}{100000000000}", False),
        ("3", "4", False),
        ("\\frac{1}{", "1", False),
    ],
)
def test_sympy_fallback(first, second, equal):
    assert sympy_equal(first, second) is equal


@pytest.mark.parametrize("truth", ["", "   ", None, 3])
def test_malformed_ground_truth_raises(truth):
    with pytest.raises(RecordError, match="math ground truth"):
        run_verifier("math", "\\boxed{3}", truth)


def test_math_verifier_works_off_the_main_thread():
    """math-verify's default SIGALRM timeouts raise off the main thread; ours are switched off (the pool bounds
    the time instead), so a trainer thread can score in-line."""
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(run_verifier("math", "\\boxed{\\dfrac{2}{4}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]
