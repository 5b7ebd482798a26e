"""IFEval verifier: both open-instruct ground-truth formats, IFEval's official rules where the older open-instruct
functions differ from them, scoring by fraction, and malformed ground truths."""

import json

import pytest

from megatron_rlvr.rewards import RecordError, run_verifier, verify
from megatron_rlvr.rewards.ifeval import OLDER_FUNCTIONS
from megatron_rlvr.rewards.ifeval_instructions import INSTRUCTIONS
from megatron_rlvr.rewards.ifeval_text import count_sentences, count_words, word_tokens

OFFICIAL_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation",
}

ENGLISH = "The committee met on Tuesday to review the budget for the coming year and agreed on every item."


def older(func_name, **kwargs):
    return json.dumps({"func_name": func_name, **kwargs})


def newer(*instructions):
    """[{"instruction_id": [...], "kwargs": [...]}] from (id, kwargs) pairs."""
    return json.dumps([{"instruction_id": [i for i, _ in instructions], "kwargs": [k for _, k in instructions]}])


def test_all_25_instruction_types_and_older_functions():
    assert set(INSTRUCTIONS.names()) == OFFICIAL_IDS
    assert len(OLDER_FUNCTIONS) == 25
    assert {instruction_id for instruction_id, _ in OLDER_FUNCTIONS.values()} == OFFICIAL_IDS


# ---------------------------------------------------------------------------------------------------------------
# Where the older checker differed from IFEval's official rules: each case is (response, ground truth, official
# verdict), and the older code gave the other verdict.

DIFFERENCES = {
    "json_in_fenced_block": ('```json\n{"name": "Ada", "born": 1815}\n```', older("validate_json_format"), 1),
    "json_in_plain_fence": ('```\n[1, 2, 3]\n```', older("validate_json_format"), 1),
    "first_word_case_insensitive": ("Summer is here.\n\nWinter follows it.",
                                    older("validate_paragraphs", N=2, first_word="winter", i=2), 1),
    "first_word_quotes_and_punctuation_stripped": ('First part.\n\n"Winter, they said, came early."',
                                                   older("validate_paragraphs", N=2, first_word="winter", i=2), 1),
    "end_phrase_case_insensitive": ("We are done here. any other questions?",
                                    older("validate_end", end_phrase="Any other questions?"), 1),
    "end_phrase_inside_closing_quote": ('"Here is my reply. Any other questions?"',
                                        older("validate_end", end_phrase="Any other questions?"), 1),
    "forbidden_word_inside_another_word": ("It is well known that the sun rises in the east.",
                                           older("validate_forbidden_words", forbidden_words=["no"]), 1),
    "forbidden_word_whole_word_still_fails": ("No, the sun does not rise in the west.",
                                              older("validate_forbidden_words", forbidden_words=["no"]), 0),
    "all_capitals_must_be_english": ("DAS IST EIN DEUTSCHER SATZ ÜBER DAS WETTER UND DIE STADT.",
                                     older("validate_uppercase"), 0),
    "all_lowercase_must_be_english": ("ceci est une phrase écrite en français pour tester la langue du texte.",
                                      older("validate_lowercase"), 0),
    "two_responses_single_after_separator": ("******\nOnly one answer here.", older("validate_two_responses"), 0),
    "two_responses_separator_at_the_end": ("Answer one.\n******\nAnswer two.\n******",
                                           older("validate_two_responses"), 1),
    "bold_counts_once": ("Here is **one bold point** only.", older("validate_highlighted_sections", N=2), 0),
    "divider_is_not_a_highlight": ("Intro\n* * *\nMore text", older("validate_highlighted_sections", N=1), 0),
    "paragraphs_split_on_three_stars": ("First paragraph.\n***\nSecond paragraph.", older("verify_paragraph_count", N=2), 1),
    "spaced_stars_are_not_a_divider": ("First paragraph.\n* * *\nSecond paragraph.", older("verify_paragraph_count", N=2), 0),
    "keyword_frequency_at_least": ("The cat and the cat and the cat.",
                                   older("verify_keyword_frequency", word="cat", N=2, relation="at least"), 1),
    "keyword_frequency_less_than": ("The cat and the cat.",
                                    older("verify_keyword_frequency", word="cat", N=3, relation="less than"), 1),
    "letter_frequency_at_least": ("banana", older("verify_letter_frequency", letter="a", N=2, relation="at least"), 1),
    "letter_frequency_less_than": ("Abba", older("verify_letter_frequency", letter="a", N=2, relation="less than"), 0),
}


@pytest.mark.parametrize("name", sorted(DIFFERENCES))
def test_official_rule_wins(name):
    response, truth, expected = DIFFERENCES[name]
    assert run_verifier("ifeval", response, truth) == float(expected)


@pytest.mark.parametrize(
    "truth",
    [older("validate_no_commas"), older("validate_lowercase"), older("validate_forbidden_words", forbidden_words=["x"]),
     older("validate_response_language", language="en"), older("verify_letter_frequency", letter="z", N=0),
     newer(("punctuation:no_comma", {}), ("keywords:forbidden_words", {"forbidden_words": ["bad"]}))],
)
@pytest.mark.parametrize("response", ["", "   ", "\n\t\n", "<think>a long thought, with commas</think>  "])
def test_empty_response_scores_zero(truth, response):
    assert run_verifier("ifeval", response, truth) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The two formats.

NO_COMMA_300_WORDS = newer(("punctuation:no_comma", {}), ("length_constraints:number_words",
                                                         {"num_words": 30, "relation": "at least"}))


def test_newer_format_scores_the_fraction_of_instructions_followed():
    long_text = " ".join(["word"] * 40)
    assert run_verifier("ifeval", long_text, NO_COMMA_300_WORDS) == 1.0
    assert run_verifier("ifeval", long_text + ", and a comma", NO_COMMA_300_WORDS) == 0.5
    assert run_verifier("ifeval", "short, with a comma", NO_COMMA_300_WORDS) == 0.0


def test_newer_format_as_python_literal_with_nulls():
    """open-instruct's Hugging Face data stores the list as a Python literal, with None for unused arguments."""
    truth = ("[{'instruction_id': ['detectable_format:title', 'keywords:frequency'], "
             "'kwargs': [None, {'keyword': 'moon', 'frequency': 2, 'relation': 'at least', 'num_words': None}]}]")
    assert run_verifier("ifeval", "<<The Moon>>\nThe moon is bright.", truth) == 1.0
    assert run_verifier("ifeval", "The Moon\nThe moon is bright.", truth) == 0.5


def test_newer_format_decoded_object_and_single_object():
    truth = [{"instruction_id": ["startend:quotation"], "kwargs": [{}]}]
    assert run_verifier("ifeval", '"quoted"', truth) == 1.0
    assert run_verifier("ifeval", '"quoted"', truth[0]) == 1.0
    assert run_verifier("ifeval", '"quoted"', json.dumps(truth[0])) == 1.0


def test_both_formats_through_verify():
    """The public entry point (through the reward pool) with each format and each dataset name."""
    assert verify("ifeval", "all lower case english text here.", older("validate_lowercase")) == 1.0
    assert verify("IFEval_Old", "All lower case english text here.", older("validate_lowercase")) == 0.0
    assert verify("ifeval", '```json\n{"a": 1}\n```', newer(("detectable_format:json_format", None))) == 1.0
    assert verify("ifeval", "plain, text", NO_COMMA_300_WORDS) == 0.0


def test_ifeval_old_rejects_the_newer_format():
    with pytest.raises(RecordError, match="instruction-list format is dataset 'ifeval'"):
        run_verifier("ifeval_old", "text", NO_COMMA_300_WORDS)


def test_older_format_keeps_open_instruct_relations():
    words = " ".join(["w"] * 18)
    assert run_verifier("ifeval", words, older("validate_word_constraint", N=20, quantifier="around")) == 1.0
    assert run_verifier("ifeval", words, older("validate_word_constraint", N=17, quantifier="at most")) == 0.0
    # Keyword and letter counts that state no relation stay exact counts, as open-instruct checked them.
    assert run_verifier("ifeval", "cat cat cat", older("verify_keyword_frequency", word="cat", N=2)) == 0.0
    assert run_verifier("ifeval", "cat cat", older("verify_keyword_frequency", word="cat", N=2)) == 1.0


def test_choice_with_the_records_options():
    truth = older("validate_choice", options=["Option A", "Option B"])
    assert run_verifier("ifeval", "I pick Option B.", truth) == 1.0
    assert run_verifier("ifeval", "My answer is yes.", truth) == 0.0
    assert run_verifier("ifeval", "My answer is yes.", newer(("detectable_format:constrained_response", {}))) == 1.0


def test_reasoning_is_stripped():
    truth = older("validate_no_commas")
    assert run_verifier("ifeval", "<think>I will write, with commas</think><answer>No commas</answer>", truth) == 1.0


def test_language_detection_is_deterministic():
    truth = older("validate_response_language", language="en")
    assert len({run_verifier("ifeval", "Short text maybe English", truth) for _ in range(5)}) == 1
    assert run_verifier("ifeval", ENGLISH, truth) == 1.0


@pytest.mark.parametrize(
    "dataset,truth,message",
    [
        ("ifeval", older("validate_nothing"), "unknown ifeval func_name 'validate_nothing'"),
        ("ifeval", json.dumps({"N": 3}), "func_name"),
        ("ifeval", "not json [", "neither JSON nor a Python literal"),
        ("ifeval", older("validate_placeholders"), "num_placeholders"),
        ("ifeval", older("validate_no_commas", N=3), r"validate_no_commas takes arguments \[\], got \['N'\]"),
        ("ifeval", older("validate_word_constraint", N=3, quantifier="roughly"), "unknown relation 'roughly'"),
        ("ifeval", older("verify_letter_frequency", letter="ab", N=1), "single letter"),
        ("ifeval", older("validate_paragraphs", N=2, first_word="x", i=3), "outside 1..num_paragraphs"),
        ("ifeval", newer(("keywords:no_such_thing", {})), "keywords:no_such_thing"),
        ("ifeval", newer(("punctuation:no_comma", {"num_words": 3})), "punctuation:no_comma takes arguments"),
        ("ifeval", json.dumps([{"instruction_id": ["punctuation:no_comma"], "kwargs": [{}, {}]}]), "equal length"),
        ("ifeval", json.dumps([]), "names no instruction"),
        ("ifeval", older("verify_keywords", keyword_list=[]), "keywords must be a non-empty list"),
        ("ifeval", newer(("keywords:forbidden_words", {"forbidden_words": "bad"})), "forbidden_words must be"),
    ],
)
def test_malformed_ground_truth_raises(dataset, truth, message):
    with pytest.raises(RecordError, match=message):
        run_verifier(dataset, "some response", truth)


def test_records_in_both_formats_load_and_score(tmp_path):
    """open-instruct JSONL records: the instruction list as a string or as JSON, and the func_name object."""
    from megatron_rlvr.data import read_rlvr_records

    messages = [{"role": "user", "content": "Write about the sea without commas."}]
    lines = [
        {"messages": messages, "dataset": "ifeval", "ground_truth": NO_COMMA_300_WORDS},
        {"messages": messages, "dataset": "ifeval", "ground_truth": json.loads(NO_COMMA_300_WORDS)},
        {"messages": messages, "dataset": "ifeval_old", "ground_truth": older("validate_no_commas")},
        {"messages": messages, "dataset": "ifeval", "ground_truth": {"func_name": "validate_no_commas"}},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_rlvr_records(path)
    response = " ".join(["calm"] * 40)
    assert [run_verifier(r.dataset, response, r.ground_truth) for r in records] == [1.0] * 4
    assert [run_verifier(r.dataset, response + ",", r.ground_truth) for r in records] == [0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("text,count", [
    ("One. Two! Three?", 3),
    ("Mr. Smith met Dr. Jones at 5 p.m. yesterday. They talked.", 2),
    ("J. R. R. Tolkien wrote it. Then he rested.", 2),
    ('He said "stop." Then he left.', 2),
    ("Wait... what happened? Nothing.", 3),
    ("A line without a full stop\nand another line", 1),
    ("Version 2.5 is out. Update now.", 2),
    ("", 0),
])
def test_sentence_count(text, count):
    assert count_sentences(text) == count


def test_words_and_tokens():
    assert count_words("Don't stop: 3.5 well-known words") == 8  # IFEval counts \w+ runs: Don, t, 3, 5, ...
    assert [t for t in word_tokens("I DON'T know, U.S. (WELL-KNOWN) now!") if t.isupper()] == \
        ["I", "DO", "N'T", "U.S", "WELL-KNOWN"]
