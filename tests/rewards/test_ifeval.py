"""IFEval verifier: the 25 open-instruct constraint functions, ground-truth parsing and its errors."""

import json

import pytest

from megatron_rlvr.rewards import RecordError, run_verifier
from megatron_rlvr.rewards.ifeval import IFEVAL_FUNCTIONS

EXPECTED_FUNCTIONS = {
    "verify_keywords", "verify_keyword_frequency", "validate_forbidden_words", "verify_letter_frequency",
    "validate_response_language", "verify_paragraph_count", "validate_word_constraint",
    "verify_sentence_constraint", "validate_paragraphs", "verify_postscript", "validate_placeholders",
    "verify_bullet_points", "validate_title", "validate_choice", "validate_highlighted_sections",
    "validate_sections", "validate_json_format", "validate_repeat_prompt", "validate_two_responses",
    "validate_uppercase", "validate_lowercase", "validate_frequency_capital_words", "validate_end",
    "validate_quotation", "validate_no_commas",
}


def gt(func_name, **kwargs):
    return json.dumps({"func_name": func_name, **kwargs})


# name -> (response, ground truth, expected score); every function has a passing and a failing case.
CASES = {
    "keywords_all_present": ("Apples and Pears are fruit.", gt("verify_keywords", keyword_list=["apples", "pears"]), 1),
    "keywords_one_missing": ("Apples are fruit.", gt("verify_keywords", keyword_list=["apples", "pears"]), 0),
    "keyword_frequency_exact": ("The cat saw a Cat; cat!", gt("verify_keyword_frequency", word="cat", N=3), 1),
    "keyword_frequency_substring_not_counted": ("cats and cat", gt("verify_keyword_frequency", word="cat", N=2), 0),
    "forbidden_absent": ("A calm reply.", gt("validate_forbidden_words", forbidden_words=["angry", "rude"]), 1),
    "forbidden_present_any_case": ("That was RUDE.", gt("validate_forbidden_words", forbidden_words=["rude"]), 0),
    "letter_frequency_exact": ("hello world", gt("verify_letter_frequency", letter="l", N=3), 1),
    "letter_frequency_case_sensitive": ("Hello", gt("verify_letter_frequency", letter="h", N=1), 0),
    "language_english": ("This is a sentence written in English about the weather today.",
                         gt("validate_response_language", language="en"), 1),
    "language_french_not_english": ("Ceci est une phrase écrite en français sur le temps qu'il fait aujourd'hui.",
                                    gt("validate_response_language", language="en"), 0),
    "language_undetectable": ("12345 !!!", gt("validate_response_language", language="en"), 0),
    "paragraph_count_dividers": ("First part.\n* * *\nSecond part.", gt("verify_paragraph_count", N=2), 1),
    "paragraph_count_empty_paragraph": ("First.\n* * *\n* * *\nLast.", gt("verify_paragraph_count", N=3), 0),
    "words_at_least": ("one two three four", gt("validate_word_constraint", N=3, quantifier="at least"), 1),
    "words_at_most_exceeded": ("one two three four", gt("validate_word_constraint", N=3, quantifier="at most"), 0),
    "words_around_within_ten_percent": (" ".join(["w"] * 18), gt("validate_word_constraint", N=20, quantifier="around"), 1),
    "words_around_outside": (" ".join(["w"] * 17), gt("validate_word_constraint", N=20, quantifier="around"), 0),
    "sentences_at_least": ("One. Two! Three?", gt("verify_sentence_constraint", N=3, quantifier="at least"), 1),
    "sentences_abbreviation_not_a_break": ("Mr. Smith came. He left.",
                                           gt("verify_sentence_constraint", N=2, quantifier="at most"), 1),
    "sentences_around_off_by_two": ("A. B. C. D.", gt("verify_sentence_constraint", N=2, quantifier="around"), 0),
    "paragraphs_first_word": ("Intro text.\n\nSecond paragraph here.",
                              gt("validate_paragraphs", N=2, first_word="Second", i=2), 1),
    "paragraphs_wrong_first_word": ("Intro text.\n\nThird paragraph here.",
                                    gt("validate_paragraphs", N=2, first_word="Second", i=2), 0),
    "postscript_present": ("Body.\nP.S. See you soon.", gt("verify_postscript", postscript_marker="P.S."), 1),
    "postscript_marker_alone": ("Body.\nP.S.", gt("verify_postscript", postscript_marker="P.S."), 0),
    "placeholders_enough": ("Dear [name], at [address].", gt("validate_placeholders", N=2), 1),
    "placeholders_too_few": ("Dear [name].", gt("validate_placeholders", N=2), 0),
    "bullets_exact": ("Intro\n* one\n  - two\n* three", gt("verify_bullet_points", N=3), 1),
    "bullets_wrong_count": ("* one\n* two", gt("verify_bullet_points", N=3), 0),
    "title_present": ("<<Poem of Joy>>\nLines.", gt("validate_title"), 1),
    "title_absent": ("Poem of Joy\nLines.", gt("validate_title"), 0),
    "choice_present": ("My answer is yes.", gt("validate_choice", options=["yes", "no", "maybe"]), 1),
    "choice_absent": ("I am unsure.", gt("validate_choice", options=["yes", "no"]), 0),
    "choice_is_a_plain_substring": ("I cannot say.", gt("validate_choice", options=["yes", "no"]), 1),
    "highlights_enough": ("*one* and *two*", gt("validate_highlighted_sections", N=2), 1),
    "highlights_too_few": ("*one* only", gt("validate_highlighted_sections", N=2), 0),
    "sections_numbered": ("SECTION 1\nfoo\nSection 2\nbar", gt("validate_sections", N=2, section_splitter="Section"), 1),
    "sections_without_numbers": ("Section\nfoo\nSection\nbar", gt("validate_sections", N=2, section_splitter="Section"), 0),
    "json_valid": ('{"a": [1, 2]}', gt("validate_json_format"), 1),
    "json_invalid": ("{'a': 1}", gt("validate_json_format"), 0),
    "repeat_prompt": ("Write a poem. Roses are red.", gt("validate_repeat_prompt", original_prompt="Write a poem."), 1),
    "repeat_prompt_changed": ("Write me a poem.", gt("validate_repeat_prompt", original_prompt="Write a poem."), 0),
    "two_responses": ("First answer.\n******\nSecond answer.", gt("validate_two_responses"), 1),
    "two_responses_identical": ("Same.\n******\nSame.", gt("validate_two_responses"), 0),
    "two_responses_three_parts": ("a ****** b ****** c", gt("validate_two_responses"), 0),
    "uppercase": ("ALL CAPS, 123!", gt("validate_uppercase"), 1),
    "uppercase_violated": ("ALL CAPs", gt("validate_uppercase"), 0),
    "lowercase": ("all lower, 123!", gt("validate_lowercase"), 1),
    "lowercase_violated": ("all Lower", gt("validate_lowercase"), 0),
    "capital_words_at_least": ("THE CAT sat on the MAT", gt("validate_frequency_capital_words", N=3, quantifier="at least"), 1),
    "capital_words_at_most": ("THE CAT sat on the MAT", gt("validate_frequency_capital_words", N=2, quantifier="at most"), 0),
    "end_phrase": ("Thanks. Is there anything else I can help with?",
                   gt("validate_end", end_phrase="Is there anything else I can help with?"), 1),
    "end_phrase_followed_by_more": ("Is there anything else I can help with? Bye.",
                                    gt("validate_end", end_phrase="Is there anything else I can help with?"), 0),
    "quotation": ('"Wrapped in quotes."', gt("validate_quotation"), 1),
    "quotation_open_only": ('"Not closed.', gt("validate_quotation"), 0),
    "no_commas": ("No commas here.", gt("validate_no_commas"), 1),
    "commas": ("One, two.", gt("validate_no_commas"), 0),
    # open-instruct's handling of the response and of the ground truth
    "reasoning_stripped": ("<think>I will write, with commas, a reply</think><answer>No commas</answer>",
                           gt("validate_no_commas"), 1),
    "answer_part_stripped_for_end": ("<think>x</think> Done. THE END  ", gt("validate_end", end_phrase="THE END"), 1),
    "null_arguments_ignored": ("hello world",
                               gt("verify_letter_frequency", letter="o", N=2, keyword_list=None, quantifier=None), 1),
}


def test_all_25_functions_registered():
    assert set(IFEVAL_FUNCTIONS.names()) == EXPECTED_FUNCTIONS


def test_every_function_has_a_passing_and_a_failing_case():
    for expected in (0, 1):
        covered = {json.loads(truth)["func_name"] for _, truth, score in CASES.values() if score == expected}
        assert covered == EXPECTED_FUNCTIONS


@pytest.mark.parametrize("name", sorted(CASES))
def test_ifeval_cases(name):
    response, truth, expected = CASES[name]
    assert run_verifier("ifeval", response, truth) == float(expected)


def test_ground_truth_as_dict():
    assert run_verifier("ifeval", "no commas", {"func_name": "validate_no_commas", "N": None}) == 1.0


def test_language_detection_is_deterministic():
    text = "Short text maybe English"
    scores = {run_verifier("ifeval", text, gt("validate_response_language", language="en")) for _ in range(5)}
    assert len(scores) == 1


@pytest.mark.parametrize(
    "truth,message",
    [
        (gt("validate_nothing"), "unknown IFEval function 'validate_nothing'"),
        (json.dumps({"N": 3}), "func_name"),
        ("not json", "not valid JSON"),
        (gt("validate_placeholders"), r"takes arguments \['N'\]"),
        (gt("validate_no_commas", N=3), "validate_no_commas takes arguments"),
        (gt("validate_word_constraint", N=3, quantifier="exactly"), "unknown quantifier 'exactly'"),
        (gt("verify_letter_frequency", letter="ab", N=1), "single character"),
        (gt("validate_paragraphs", N=2, first_word="x", i=3), "outside 1..N"),
    ],
)
def test_malformed_constraint_raises(truth, message):
    with pytest.raises(RecordError, match=message):
        run_verifier("ifeval", "some response", truth)


def test_unknown_function_error_lists_known_ones():
    with pytest.raises(ValueError) as err:
        run_verifier("ifeval", "x", gt("no_such_check"))
    assert "no_such_check" in str(err.value) and "validate_no_commas" in str(err.value)
