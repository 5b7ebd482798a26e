"""IFEval instruction following (open-instruct `dataset: ifeval` and `ifeval_old`).

Two ground-truth formats, both as open-instruct writes them (a JSON string, a Python-literal string as in
open-instruct's Hugging Face data, or the decoded object):

- the instruction list (open-instruct's current RLVR data, dataset `ifeval`):
  `[{"instruction_id": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [null, {"num_words": 300, "relation": "at least"}]}]`, IFEval's own ids and argument names;
- the older single function (Tülu 3's RLVR-IFeval, dataset `ifeval_old`):
  `{"func_name": "validate_word_constraint", "N": 300, "quantifier": "at least", "end_phrase": null}`, one of
  the 25 function names of open-instruct's `if_functions.py`, each the same check as an IFEval instruction
  (`OLDER_FUNCTIONS`).

`ifeval` accepts both (told apart by the `func_name` key), `ifeval_old` only the second. Null arguments are
dropped. Every instruction is checked by IFEval's official rule (`ifeval_instructions`), also for the older
format: where open-instruct's training-time functions differ (forbidden words matched inside other words,
case-sensitive end phrases and first words, JSON without its code fence, exact keyword counts, paragraphs split
on `* * *`, all-caps without the English requirement, ...), the official rule wins. Arguments the older format
has and IFEval does not keep their open-instruct meaning: `quantifier` "at most" and "around", the options of
`validate_choice`, and "exactly" as the relation of keyword and letter counts that name none.

Score: the fraction of the prompt's instructions the response follows, as open-instruct's IFEval verifier
scores it (IFEval's instruction-level accuracy; its prompt-level strict accuracy would be 1 only when all are
followed). As in open-instruct the response is first stripped of any reasoning before the last `</think>` and of
`<answer>` tags, and a response with nothing left scores 0. A malformed ground truth (unknown instruction or
function, missing or unexpected argument, unknown relation) raises `RecordError`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
from typing import Any, Callable

from megatron_rlvr.rewards.ifeval_instructions import INSTRUCTIONS
from megatron_rlvr.rewards.registry import RecordError, register_verifier

# func_name -> (IFEval instruction id, {older argument: IFEval argument}).
OLDER_FUNCTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "verify_keywords": ("keywords:existence", {"keyword_list": "keywords"}),
    "verify_keyword_frequency": ("keywords:frequency",
                                 {"word": "keyword", "N": "frequency", "quantifier": "relation", "relation": "relation"}),
    "validate_forbidden_words": ("keywords:forbidden_words", {"forbidden_words": "forbidden_words"}),
    "verify_letter_frequency": ("keywords:letter_frequency", {"letter": "letter", "N": "let_frequency",
                                                              "quantifier": "let_relation", "relation": "let_relation"}),
    "validate_response_language": ("language:response_language", {"language": "language"}),
    "verify_paragraph_count": ("length_constraints:number_paragraphs", {"N": "num_paragraphs"}),
    "validate_word_constraint": ("length_constraints:number_words", {"N": "num_words", "quantifier": "relation"}),
    "verify_sentence_constraint": ("length_constraints:number_sentences",
                                   {"N": "num_sentences", "quantifier": "relation"}),
    "validate_paragraphs": ("length_constraints:nth_paragraph_first_word",
                            {"N": "num_paragraphs", "i": "nth_paragraph", "first_word": "first_word"}),
    "verify_postscript": ("detectable_content:postscript", {"postscript_marker": "postscript_marker"}),
    "validate_placeholders": ("detectable_content:number_placeholders", {"N": "num_placeholders"}),
    "verify_bullet_points": ("detectable_format:number_bullet_lists", {"N": "num_bullets"}),
    "validate_title": ("detectable_format:title", {}),
    "validate_choice": ("detectable_format:constrained_response", {"options": "options"}),
    "validate_highlighted_sections": ("detectable_format:number_highlighted_sections", {"N": "num_highlights"}),
    "validate_sections": ("detectable_format:multiple_sections",
                          {"N": "num_sections", "section_splitter": "section_spliter"}),
    "validate_json_format": ("detectable_format:json_format", {}),
    "validate_repeat_prompt": ("combination:repeat_prompt", {"original_prompt": "prompt_to_repeat"}),
    "validate_two_responses": ("combination:two_responses", {}),
    "validate_uppercase": ("change_case:english_capital", {}),
    "validate_lowercase": ("change_case:english_lowercase", {}),
    "validate_frequency_capital_words": ("change_case:capital_word_frequency",
                                         {"N": "capital_frequency", "quantifier": "capital_relation"}),
    "validate_end": ("startend:end_checker", {"end_phrase": "end_phrase"}),
    "validate_quotation": ("startend:quotation", {}),
    "validate_no_commas": ("punctuation:no_comma", {}),
}
# The older format states no relation for keyword and letter counts: open-instruct checks them as exact counts.
_OLDER_DEFAULTS = {"keywords:frequency": {"relation": "exactly"}, "keywords:letter_frequency": {"let_relation": "exactly"}}

Instruction = tuple[str, Callable[..., bool], dict]


def _decode(ground_truth: Any) -> Any:
    """The ground truth as Python objects: JSON first, then a Python literal (open-instruct's HF data)."""
    if not isinstance(ground_truth, str):
        return ground_truth
    try:
        return json.loads(ground_truth)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(ground_truth)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise RecordError(f"ifeval ground truth is neither JSON nor a Python literal: {ground_truth[:200]!r}") from None


def _bind(instruction_id: str, kwargs: Any) -> Instruction:
    """(id, check, kwargs) with the arguments checked against the instruction's signature."""
    try:
        check = INSTRUCTIONS.get(instruction_id)
    except ValueError as err:
        raise RecordError(str(err)) from None
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise RecordError(f"ifeval instruction {instruction_id}: kwargs must be an object, got {kwargs!r:.200}")
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        inspect.signature(check).bind("", **kwargs)
    except TypeError as err:
        params = [name for name in inspect.signature(check).parameters if name != "text"]
        raise RecordError(f"ifeval instruction {instruction_id} takes arguments {params}, got {sorted(kwargs)}: "
                          f"{err}") from None
    return instruction_id, check, kwargs


def _older(constraint: dict) -> list[Instruction]:
    func_name = constraint["func_name"]
    if func_name not in OLDER_FUNCTIONS:
        raise RecordError(f"unknown ifeval func_name {func_name!r}; known: {', '.join(sorted(OLDER_FUNCTIONS))}")
    instruction_id, renames = OLDER_FUNCTIONS[func_name]
    arguments = {key: value for key, value in constraint.items() if key != "func_name" and value is not None}
    unexpected = sorted(set(arguments) - set(renames))
    if unexpected:
        raise RecordError(f"ifeval func_name {func_name} takes arguments {sorted(renames)}, got {unexpected} too")
    kwargs = dict(_OLDER_DEFAULTS.get(instruction_id, {}))
    kwargs.update({renames[key]: value for key, value in arguments.items()})
    return [_bind(instruction_id, kwargs)]


def _newer(constraints: list) -> list[Instruction]:
    instructions = []
    for constraint in constraints:
        constraint = _decode(constraint)
        if not isinstance(constraint, dict) or "instruction_id" not in constraint:
            raise RecordError(f"ifeval ground truth must be an object with 'func_name' (the older format) or a list "
                              f"of objects with 'instruction_id' and 'kwargs', got {str(constraint)[:200]!r}")
        ids = constraint["instruction_id"]
        ids = [ids] if isinstance(ids, str) else ids
        kwargs_list = constraint.get("kwargs") or [None] * len(ids)
        if not isinstance(ids, list) or not isinstance(kwargs_list, list) or len(ids) != len(kwargs_list):
            raise RecordError(f"ifeval 'instruction_id' and 'kwargs' must be lists of equal length, got "
                              f"{str(constraint)[:200]!r}")
        instructions.extend(_bind(instruction_id, kwargs) for instruction_id, kwargs in zip(ids, kwargs_list))
    if not instructions:
        raise RecordError("ifeval ground truth names no instruction")
    return instructions


@functools.lru_cache(maxsize=4096)
def _parse_text(ground_truth: str, allow_newer: bool) -> tuple[Instruction, ...]:
    return tuple(parse_instructions(_decode(ground_truth), allow_newer))


def parse_instructions(ground_truth: Any, allow_newer: bool = True) -> list[Instruction]:
    """The (instruction id, check, kwargs) list of a ground truth in either format (module docstring)."""
    if isinstance(ground_truth, str):
        return list(_parse_text(ground_truth, allow_newer))
    if isinstance(ground_truth, dict) and "func_name" in ground_truth:
        return _older(ground_truth)
    if allow_newer and isinstance(ground_truth, (list, dict)):
        return _newer(ground_truth if isinstance(ground_truth, list) else [ground_truth])
    expected = "a JSON object with a 'func_name' key" + (
        " or a list of {'instruction_id': [...], 'kwargs': [...]} objects" if allow_newer else
        " (the instruction-list format is dataset 'ifeval')")
    raise RecordError(f"ifeval ground truth must be {expected}, got {str(ground_truth)[:200]!r}")


def strip_reasoning(response: str) -> str:
    """The answer part of a response: after the last `</think>`, without `<answer>` tags, stripped."""
    answer = response.split("</think>")[-1]
    return answer.replace("<answer>", "").replace("</answer>", "").strip()


def score_instructions(prediction: str, instructions: list[Instruction]) -> float:
    """Fraction of the instructions the answer part of `prediction` follows (0 when there is no answer)."""
    answer = strip_reasoning(prediction)
    if not answer:
        return 0.0
    return sum(bool(check(answer, **kwargs)) for _, check, kwargs in instructions) / len(instructions)


@register_verifier("ifeval")
def verify_ifeval(prediction: str, ground_truth: Any) -> float:
    """Fraction of the ground truth's instructions followed; either format (module docstring)."""
    return score_instructions(prediction, parse_instructions(ground_truth))


@register_verifier("ifeval_old")
def verify_ifeval_old(prediction: str, ground_truth: Any) -> float:
    """1.0 when the response follows the `func_name` constraint, else 0.0 (open-instruct's `ifeval_old`)."""
    return score_instructions(prediction, parse_instructions(ground_truth, allow_newer=False))
