"""How IFEval counts: words, sentences and word tokens of a response, and its language.

Google's checker counts words with NLTK's `RegexpTokenizer(r"\\w+")`, sentences with NLTK's pretrained English
Punkt model and tokens (for capital words) with `nltk.word_tokenize`. NLTK's Punkt model is a data download that
no package index serves, so sentences and tokens are computed here by rules that give Punkt's and the Treebank
tokenizer's answers on ordinary prose:

- a sentence ends at `.`, `?` or `!` (repeated, and followed by closing quotes or brackets) before whitespace or
  the end of the text, except after a common abbreviation (`Mr.`, `e.g.`, `etc.`), a single-letter initial
  (`J. Smith`) or an ordinal-like number followed by a lowercase word; a line break alone does not end one;
- a token is a whitespace-separated chunk with its leading and trailing punctuation split off, and English
  contractions split as the Treebank tokenizer does (`DON'T` -> `DO`, `N'T`).
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"\w+")

# Lowercased, without the final period: Punkt's English model knows these (and many rarer ones) as abbreviations.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp no fig approx dept est govt misc jan feb mar apr "
    "jun jul aug sep sept oct nov dec mt ft u.s a.m p.m ph.d".split()
)
_CLOSERS = "\"'\u201d\u2019)]"
_SENTENCE_END = re.compile(r"[.?!]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_CONTRACTION = re.compile(r"(?i)(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_EDGE_PUNCTUATION = "\"'`.,;:!?()[]{}<>\u201c\u201d\u2018\u2019*_~#"


def count_words(text: str) -> int:
    """Number of `\\w+` runs (IFEval's word count: "don't" is two words, "3.5" is two)."""
    return len(_WORD.findall(text))


def _ends_sentence(text: str, match: re.Match) -> bool:
    if match.group().rstrip(_CLOSERS) == ".":
        # The word before the period; abbreviations are short, so a short window is enough (and keeps it linear).
        preceding = text[max(0, match.start() - 12):match.start()].split()
        token = preceding[-1].lstrip("\"'(\u201c\u2018[").lower() if preceding else ""
        if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
            return False
        following = text[match.end():].lstrip()[:1]
        if token.isdigit() and following.islower():
            return False
    return True


def count_sentences(text: str) -> int:
    """Number of sentences (see the module docstring); text with no ending punctuation is one sentence."""
    count, start = 0, 0
    for match in _SENTENCE_END.finditer(text):
        if text[start:match.start()].strip() and _ends_sentence(text, match):
            count += 1
            start = match.end()
    return count + (1 if text[start:].strip() else 0)


def word_tokens(text: str) -> list[str]:
    """Treebank-like word tokens: punctuation split off the edges of each chunk, contractions split."""
    tokens = []
    for chunk in text.split():
        core = chunk.strip(_EDGE_PUNCTUATION)
        if not core:
            continue
        contraction = _CONTRACTION.match(core)
        tokens.extend(contraction.groups() if contraction else (core,))
    return tokens


@functools.lru_cache(maxsize=1)
def _langdetect():
    import langdetect

    # langdetect samples n-grams at random; a fixed seed makes the same text always get the same language.
    langdetect.DetectorFactory.seed = 0
    return langdetect


def detected_language(text: str) -> str | None:
    """langdetect's ISO 639-1 code for the text (what IFEval uses), or None when it cannot tell (no letters)."""
    langdetect = _langdetect()
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None
