"""IFEval-style instruction following (open-instruct `dataset: ifeval`, the RLVR-IFeval records).

The ground truth is a JSON object `{"func_name": NAME, ARG: VALUE, ...}`; null arguments are dropped and the
rest are passed by keyword to the constraint function NAME, one of the 25 below. Each function follows the
semantics of the function of the same name in open-instruct's `open_instruct/if_functions.py` (the checker the
Tülu 3 RLVR data was built for), with its argument names. As there, the response is first stripped of any
reasoning before the last `</think>` and of `<answer>` tags. Where open-instruct would crash or silently return
False on a malformed constraint (unknown function, missing or unexpected argument, an unknown quantifier, a
multi-letter "letter") this raises `RecordError` instead: it is the record that is wrong, not the response.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any, Callable

from megatron_rlvr.registry import Registry
from megatron_rlvr.rewards.registry import RecordError, register_verifier

IFEVAL_FUNCTIONS = Registry("IFEval function")
_constraint = IFEVAL_FUNCTIONS.register

QUANTIFIERS = ("at least", "around", "at most")


def _compare_count(actual: int, N: int, quantifier: str, around_tolerance: int) -> bool:
    """`actual` against `N` under "at least" (>=), "at most" (<=) or "around" (|actual - N| <= tolerance)."""
    if quantifier == "at least":
        return actual >= N
    if quantifier == "at most":
        return actual <= N
    if quantifier == "around":
        return abs(actual - N) <= around_tolerance
    raise RecordError(f"unknown quantifier {quantifier!r}; expected one of {', '.join(QUANTIFIERS)}")


def _ten_percent(N: int) -> int:
    """open-instruct's "around" tolerance for word counts: 10% of N (Python rounding), at least 1."""
    return max(round(N * 0.1), 1)


@_constraint("verify_keywords")
def verify_keywords(text: str, keyword_list: list) -> bool:
    """Every keyword occurs in the text (case-insensitive substring)."""
    lowered = text.lower()
    return all(keyword.lower() in lowered for keyword in keyword_list)


@_constraint("verify_keyword_frequency")
def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    """`word` occurs exactly N times as a whole `\\w+` token (case-insensitive)."""
    target = word.lower()
    return sum(token == target for token in re.findall(r"\b\w+\b", text.lower())) == N


@_constraint("validate_forbidden_words")
def validate_forbidden_words(text: str, forbidden_words: list) -> bool:
    """None of the words occurs in the text (case-insensitive substring)."""
    lowered = text.lower()
    return not any(word.lower() in lowered for word in forbidden_words)


@_constraint("verify_letter_frequency")
def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    """The (case-sensitive) character `letter` occurs exactly N times."""
    if len(letter) != 1:
        raise RecordError(f"verify_letter_frequency needs a single character as 'letter', got {letter!r}")
    return text.count(letter) == N


@functools.lru_cache(maxsize=1)
def _langdetect():
    import langdetect

    # langdetect samples n-grams at random; a fixed seed makes the same text always get the same language.
    langdetect.DetectorFactory.seed = 0
    return langdetect


@_constraint("validate_response_language")
def validate_response_language(text: str, language: str) -> bool:
    """langdetect's language code for the text equals `language` (e.g. "en"); text without any letters, which
    langdetect cannot classify, fails."""
    langdetect = _langdetect()
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:
        return False


@_constraint("verify_paragraph_count")
def verify_paragraph_count(text: str, N: int) -> bool:
    """Exactly N non-empty paragraphs separated by the markdown divider `* * *` (lines stripped first)."""
    cleaned = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = cleaned.split("* * *")
    return all(paragraph.strip() for paragraph in paragraphs) and len(paragraphs) == N


@_constraint("validate_word_constraint")
def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    """Whitespace-separated word count vs N; "around" allows 10% of N (at least 1)."""
    return _compare_count(len(text.split()), N, quantifier, _ten_percent(N))


# A sentence ends at whitespace after ".", "?" or "!", except after an abbreviation like "e.g." or "Mr.".
_SENTENCE_BREAK = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=[.?!])\s")


@_constraint("verify_sentence_constraint")
def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    """Sentence count vs N; "around" allows a difference of 1."""
    return _compare_count(len(_SENTENCE_BREAK.split(text)), N, quantifier, 1)


@_constraint("validate_paragraphs")
def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    """Exactly N paragraphs separated by a blank line ("\\n\\n"), the i-th (1-based) starting with `first_word`."""
    if not 1 <= i <= N:
        raise RecordError(f"validate_paragraphs: paragraph index i={i} is outside 1..N={N}")
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and paragraphs[i - 1].strip().startswith(first_word)


@_constraint("verify_postscript")
def verify_postscript(text: str, postscript_marker: str) -> bool:
    """The marker (e.g. "P.S.") occurs and is followed by some text."""
    start = text.find(postscript_marker)
    return start >= 0 and len(text[start:].strip()) > len(postscript_marker)


@_constraint("validate_placeholders")
def validate_placeholders(text: str, N: int) -> bool:
    """At least N square-bracket placeholders such as `[address]`."""
    return len(re.findall(r"\[(.*?)\]", text)) >= N


@_constraint("verify_bullet_points")
def verify_bullet_points(text: str, N: int) -> bool:
    """Exactly N lines that start (after indentation) with a markdown bullet, `*` or `-`."""
    return sum(line.strip().startswith(("*", "-")) for line in text.split("\n")) == N


@_constraint("validate_title")
def validate_title(text: str) -> bool:
    """A title in double angular brackets, `<<like this>>`, on one line."""
    return re.search(r"<<(.*?)>>", text) is not None


@_constraint("validate_choice")
def validate_choice(text: str, options: list) -> bool:
    """One of the options occurs in the text (plain substring, as in open-instruct)."""
    return any(option in text for option in options)


@_constraint("validate_highlighted_sections")
def validate_highlighted_sections(text: str, N: int) -> bool:
    """At least N markdown highlights `*like this*` (non-greedy `\\*(.*?)\\*` matches)."""
    return len(re.findall(r"\*(.*?)\*", text)) >= N


@_constraint("validate_sections")
def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    """At least N numbered section headers: the splitter followed by a number, e.g. "Section 1", "SECTION 2"
    (case-insensitive)."""
    header = re.compile(r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?", re.IGNORECASE)
    return len(header.split(text)) - 1 >= N


@_constraint("validate_json_format")
def validate_json_format(text: str) -> bool:
    """The whole response parses as JSON (nesting too deep for Python's parser does not count)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@_constraint("validate_repeat_prompt")
def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    """The response starts with the prompt, unchanged."""
    return text.startswith(original_prompt)


@_constraint("validate_two_responses")
def validate_two_responses(text: str) -> bool:
    """Exactly one `******` separator, between two different (after stripping) responses."""
    if text.count("******") != 1:
        return False
    first, second = (part.strip() for part in text.split("******"))
    return first != second


@_constraint("validate_uppercase")
def validate_uppercase(text: str) -> bool:
    """No lowercase letters: the text equals its uppercase form."""
    return text == text.upper()


@_constraint("validate_lowercase")
def validate_lowercase(text: str) -> bool:
    """No capital letters: the text equals its lowercase form."""
    return text == text.lower()


@_constraint("validate_frequency_capital_words")
def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    """Count of all-capital ASCII words (`\\b[A-Z]+\\b`) vs N; "around" allows 10% of N (at least 1)."""
    return _compare_count(len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier, _ten_percent(N))


@_constraint("validate_end")
def validate_end(text: str, end_phrase: str) -> bool:
    """The response ends with exactly this phrase."""
    return text.endswith(end_phrase)


@_constraint("validate_quotation")
def validate_quotation(text: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    return text.startswith('"') and text.endswith('"')


@_constraint("validate_no_commas")
def validate_no_commas(text: str) -> bool:
    """No commas at all."""
    return "," not in text


def strip_reasoning(response: str) -> str:
    """The answer part of a response: after the last `</think>`, without `<answer>` tags, stripped."""
    answer = response.split("</think>")[-1]
    return answer.replace("<answer>", "").replace("</answer>", "").strip()


def parse_constraint(ground_truth: Any) -> tuple[Callable[..., bool], dict]:
    """(function, keyword arguments) from an IFEval ground truth: a JSON object string, or the dict itself."""
    if isinstance(ground_truth, str):
        try:
            ground_truth = json.loads(ground_truth)
        except json.JSONDecodeError as err:
            raise RecordError(f"ifeval ground truth is not valid JSON ({err}): {ground_truth[:200]!r}") from None
    if not isinstance(ground_truth, dict) or "func_name" not in ground_truth:
        raise RecordError(f"ifeval ground truth must be a JSON object with a 'func_name' key, got "
                          f"{str(ground_truth)[:200]!r}")
    kwargs = {key: value for key, value in ground_truth.items() if key != "func_name" and value is not None}
    try:
        function = IFEVAL_FUNCTIONS.get(ground_truth["func_name"])
    except ValueError as err:
        raise RecordError(str(err)) from None
    try:
        inspect.signature(function).bind("", **kwargs)
    except TypeError as err:
        params = [name for name in inspect.signature(function).parameters if name != "text"]
        raise RecordError(f"ifeval constraint {ground_truth['func_name']} takes arguments {params}, got "
                          f"{sorted(kwargs)}: {err}") from None
    return function, kwargs


@register_verifier("ifeval")
def verify_ifeval(prediction: str, ground_truth: Any) -> float:
    """1.0 when the response satisfies the constraint named by the ground truth, else 0.0."""
    function, kwargs = parse_constraint(ground_truth)
    return float(bool(function(strip_reasoning(prediction), **kwargs)))
