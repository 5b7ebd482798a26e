"""IFEval's 25 instruction types, each a check `fn(response, **kwargs) -> bool` registered under its official id.

The rules are those of Google's reference checker (`instruction_following_eval/instructions.py`, Apache-2.0), the
strict variant (the response as given, no loosened copies), with its argument names. Where the reference
would pick a random argument because one is missing, or would crash on a malformed one, this raises
`RecordError` instead: the record is wrong, not the response. Deliberate differences from the reference:

- keywords, the keyword of `keywords:frequency`, section splitters and postscript markers are matched as
  literal text (the reference passes them to `re` unescaped, which only differs for text such as `C++`);
- `language:response_language`, `change_case:english_capital` and `change_case:english_lowercase` detect the
  language with a fixed langdetect seed, so a response always gets the same verdict;
- sentences and word tokens are counted without NLTK's Punkt model (see `ifeval_text`).

Relations: the reference has "less than" and "at least". The older open-instruct format also uses "at most",
"around" (within `around` of the target) and, for keyword and letter frequencies, "exactly"; they are accepted
for the count checks that open-instruct applied them to.
"""

from __future__ import annotations

import json
import re
from typing import Any

from megatron_rlvr.registry import Registry
from megatron_rlvr.rewards.ifeval_text import count_sentences, count_words, detected_language, word_tokens
from megatron_rlvr.rewards.registry import RecordError

INSTRUCTIONS = Registry("IFEval instruction")
_instruction = INSTRUCTIONS.register

RELATIONS = ("less than", "at least", "at most", "around", "exactly")
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def compare_count(actual: int, target: int, relation: str, around: int = 0) -> bool:
    """`actual` against `target` under a relation: "less than" (<), "at least" (>=), "at most" (<=), "exactly"
    (==) or "around" (|actual - target| <= `around`)."""
    if relation == "less than":
        return actual < target
    if relation == "at least":
        return actual >= target
    if relation == "at most":
        return actual <= target
    if relation == "exactly":
        return actual == target
    if relation == "around":
        return abs(actual - target) <= around
    raise RecordError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")


def _ten_percent(target: int) -> int:
    """open-instruct's "around" tolerance for word and capital-word counts: 10% of the target, at least 1."""
    return max(round(target * 0.1), 1)


def _word_list(words: Any, what: str) -> list:
    """The record's list of words; IFEval would draw random ones for an empty list, which no record means."""
    if not isinstance(words, list) or not words:
        raise RecordError(f"{what} must be a non-empty list of words, got {words!r:.200}")
    return words


def _literal(pattern: str, what: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise RecordError(f"{what} must be a non-empty string, got {pattern!r}")
    return re.escape(pattern.strip())


@_instruction("keywords:existence")
def keywords_existence(text: str, *, keywords: list) -> bool:
    """Every keyword occurs in the response, anywhere (case-insensitive substring)."""
    return all(re.search(_literal(keyword, "a keyword"), text, re.IGNORECASE)
               for keyword in _word_list(keywords, "keywords"))


@_instruction("keywords:frequency")
def keywords_frequency(text: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """Occurrences of the keyword (case-insensitive substring, so "cats" counts for "cat") vs `frequency`."""
    occurrences = len(re.findall(_literal(keyword, "keyword"), text, re.IGNORECASE))
    return compare_count(occurrences, frequency, relation)


@_instruction("keywords:forbidden_words")
def keywords_forbidden_words(text: str, *, forbidden_words: list) -> bool:
    """None of the words occurs as a whole word (`\\bword\\b`, case-insensitive): "no" inside "known" is fine."""
    return not any(re.search(rf"\b{_literal(word, 'a forbidden word')}\b", text, re.IGNORECASE)
                   for word in _word_list(forbidden_words, "forbidden_words"))


@_instruction("keywords:letter_frequency")
def keywords_letter_frequency(text: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of the letter, case-insensitive, vs `let_frequency`."""
    if not isinstance(letter, str) or len(letter.strip()) != 1:
        raise RecordError(f"keywords:letter_frequency needs a single letter, got {letter!r}")
    return compare_count(text.lower().count(letter.strip().lower()), let_frequency, let_relation)


@_instruction("language:response_language")
def language_response_language(text: str, *, language: str) -> bool:
    """langdetect's language for the whole response is `language` (ISO 639-1, e.g. "en"); a response in which
    langdetect finds nothing to classify (no letters) passes, as in the reference."""
    detected = detected_language(text)
    return detected is None or detected == language


@_instruction("length_constraints:number_sentences")
def number_sentences(text: str, *, num_sentences: int, relation: str) -> bool:
    """Sentence count vs `num_sentences` ("around": within 1)."""
    return compare_count(count_sentences(text), num_sentences, relation, around=1)


@_instruction("length_constraints:number_paragraphs")
def number_paragraphs(text: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider `***` (with at most one whitespace
    character either side); an empty paragraph between two dividers fails, empty ends do not count."""
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if 0 < index < len(paragraphs) - 1:
                return False
            count -= 1
    return count == num_paragraphs


@_instruction("length_constraints:number_words")
def number_words(text: str, *, num_words: int, relation: str) -> bool:
    """`\\w+` word count vs `num_words` ("around": within 10%)."""
    return compare_count(count_words(text), num_words, relation, around=_ten_percent(num_words))


_FIRST_WORD_STOP = frozenset(".,?!'\"")


@_instruction("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(text: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` non-empty paragraphs separated by blank lines ("\\n\\n"), and paragraph
    `nth_paragraph` (1-based) starts with `first_word`, compared case-insensitively after dropping leading
    quotes and anything from the first punctuation mark on ("Summer," and "\\"summer" match "summer")."""
    if not 1 <= nth_paragraph <= num_paragraphs:
        raise RecordError(f"nth_paragraph={nth_paragraph} is outside 1..num_paragraphs={num_paragraphs}")
    paragraphs = text.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    prefix = []
    for char in word:
        if char in _FIRST_WORD_STOP:
            break
        prefix.append(char.lower())
    return count == num_paragraphs and "".join(prefix) == first_word.lower()


@_instruction("detectable_content:number_placeholders")
def number_placeholders(text: str, *, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as `[address]`."""
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


@_instruction("detectable_content:postscript")
def postscript(text: str, *, postscript_marker: str) -> bool:
    """The marker occurs, case-insensitively; "P.S." and "P.P.S" also in spaced spellings ("p. s.")."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + _literal(marker.lower(), "postscript_marker") + r".*$"
    return re.search(pattern, text.lower(), re.MULTILINE) is not None


@_instruction("detectable_format:number_bullet_lists")
def number_bullet_lists(text: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` lines that start (after indentation) with `* ` style bullets (a `*` not followed by
    another `*`) or `-`."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@_instruction("detectable_format:constrained_response")
def constrained_response(text: str, *, options: list = CONSTRAINED_RESPONSE_OPTIONS) -> bool:
    """One of the options occurs in the response (IFEval's options are "My answer is yes." / "no." / "maybe.";
    the older open-instruct records name their own)."""
    stripped = text.strip()
    return any(option in stripped for option in options)


@_instruction("detectable_format:number_highlighted_sections")
def number_highlighted_sections(text: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty markdown highlights on one line: `*italic*` or `**bold**` (each counts
    once); an empty pair such as the stars of a `* * *` divider does not count."""
    singles = re.findall(r"\*[^\n\*]*\*", text)
    doubles = re.findall(r"\*\*[^\n\*]*\*\*", text)
    count = sum(1 for match in singles if match.strip("*").strip())
    count += sum(1 for match in doubles if match[2:-2].strip())
    return count >= num_highlights


@_instruction("detectable_format:multiple_sections")
def multiple_sections(text: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` headers made of the splitter and a number ("Section 1"); case-sensitive, as the
    prompt names the exact splitter."""
    header = r"\s?" + _literal(section_spliter, "section_spliter") + r"\s?\d+\s?"
    return len(re.split(header, text)) - 1 >= num_sections


@_instruction("detectable_format:json_format")
def json_format(text: str) -> bool:
    """The response parses as JSON, optionally inside a markdown code fence (```json ... ```)."""
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    try:
        json.loads(body.removesuffix("```").strip())
    except (ValueError, RecursionError):
        return False
    return True


@_instruction("detectable_format:title")
def title(text: str) -> bool:
    """A non-empty title in double angular brackets on one line, `<<like this>>`."""
    return any(match.lstrip("<").rstrip(">").strip() for match in re.findall(r"<<[^\n]+>>", text))


@_instruction("combination:two_responses")
def two_responses(text: str) -> bool:
    """Two different non-empty responses separated by `******`, and nothing else between separators."""
    parts = text.split("******")
    responses = []
    for index, part in enumerate(parts):
        if part.strip():
            responses.append(part.strip())
        elif 0 < index < len(parts) - 1:
            return False
    return len(responses) == 2 and responses[0] != responses[1]


@_instruction("combination:repeat_prompt")
def repeat_prompt(text: str, *, prompt_to_repeat: str) -> bool:
    """The response starts with the prompt, case-insensitively, leading and trailing whitespace ignored."""
    if not isinstance(prompt_to_repeat, str) or not prompt_to_repeat.strip():
        raise RecordError(f"combination:repeat_prompt needs a non-empty prompt_to_repeat, got {prompt_to_repeat!r}")
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_instruction("startend:end_checker")
def end_checker(text: str, *, end_phrase: str) -> bool:
    """The response ends with the phrase, case-insensitively, once surrounding whitespace and double quotes
    are stripped."""
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_instruction("change_case:capital_word_frequency")
def capital_word_frequency(text: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Word tokens in capitals (`str.isupper`: "I", "U.S.", "WELL-KNOWN") vs `capital_frequency` ("around":
    within 10%)."""
    capitals = sum(1 for token in word_tokens(text) if token.isupper())
    return compare_count(capitals, capital_frequency, capital_relation, around=_ten_percent(capital_frequency))


def _english(text: str) -> bool:
    return detected_language(text) in ("en", None)


@_instruction("change_case:english_capital")
def english_capital(text: str) -> bool:
    """All cased letters are capitals (at least one) and the response is in English."""
    return text.isupper() and _english(text)


@_instruction("change_case:english_lowercase")
def english_lowercase(text: str) -> bool:
    """All cased letters are lowercase (at least one) and the response is in English."""
    return text.islower() and _english(text)


@_instruction("punctuation:no_comma")
def no_comma(text: str) -> bool:
    """No commas."""
    return "," not in text


@_instruction("startend:quotation")
def quotation(text: str) -> bool:
    """The response, stripped, is wrapped in double quotation marks (and is more than one character)."""
    stripped = text.strip()
    return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'

