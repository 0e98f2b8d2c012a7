"""A Java-free stand-in for the tokenizer of the COCO caption evaluation.

The reference (pycocoevalcap ``tokenizer/ptbtokenizer.py``) pipes every caption through Stanford
CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` and then drops the tokens
``'' ' `` ` . ? ! , : - -- ... ;``. Because the lower-casing happens first, the bracket tokens
(``-lrb-``, ``-rrb-`` …) are *not* dropped, and neither are ``?!``, ``$``, ``%`` or ``*``.

``coco_tokenize`` reproduces that output with regular expressions for what captions contain: clitics
split off (``is n't``, ``man 's``, ``ca n't``, ``can not``), punctuation split off except inside
numbers (``1,000``, ``3:30``, ``5.50``), acronyms (``u.s.``, ``e.g.``) and web-ish words
(``www.example.com``), hyphenated and slashed words kept whole. tests/eval/test_metrics.py pins its
output against the Java tokenizer's on a fixed set of captions; it is not a full PTBLexer.
"""

from __future__ import annotations

import re

# pycocoevalcap ptbtokenizer.py PUNCTUATIONS, as they can match after -lowerCase.
REMOVED_TOKENS = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTBLexer splits these words in two (the Penn Treebank tokenization rules).
_SPLIT_WORDS = {
    "cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "gimme": "gim me",
    "lemme": "lem me", "'tis": "'t is", "'twas": "'t was", "'em": "'em",
}  # fmt: skip
# Abbreviations whose final period stays on the word (a small subset of PTBLexer's list).
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "mt"}
)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})  # PTB normalizes
_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$", re.IGNORECASE)  # u.s. e.g. p.m.
_N_BETWEEN = re.compile(r"^(\w+)('n')(\w+)$", re.IGNORECASE)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


def coco_tokenize(text: str) -> str:
    """Lower-cased tokens joined by single spaces, punctuation dropped as the COCO evaluation does."""
    text = text.replace("\n", " ").translate(_QUOTES)
    text = re.sub(r"\.\.\.+|--+|[\u2013\u2014]|[\"`]", " ", text)  # ellipses, dashes, double quotes
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"[;$%*]", r" \g<0> ", text)
    text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", text)  # kept only between digits: 1,000 3:30
    text = re.sub(r"[?!]+", r" \g<0> ", text)
    tokens: list[str] = []
    for word in text.split():
        tokens += _split_word(word)
    return " ".join(t for t in (t.lower() for t in tokens) if t not in REMOVED_TOKENS)


def _split_word(word: str) -> list[str]:
    """One whitespace-free chunk → tokens: quotes, a sentence period, clitics split off."""
    lead: list[str] = []
    tail: list[str] = []
    while word.startswith("'") and word.lower() not in _SPLIT_WORDS and len(word) > 1:
        lead.append("'")
        word = word[1:]
    while len(word) > 1 and (word.endswith("'") or (word.endswith(".") and not _keeps_period(word))):
        tail.insert(0, word[-1])
        word = word[:-1]
    if word.lower() in _SPLIT_WORDS:
        return lead + _SPLIT_WORDS[word.lower()].split() + tail
    if match := _N_BETWEEN.match(word):  # rock'n'roll
        return [*lead, *match.groups(), *tail]
    match = _CLITIC.match(word)
    if match and match.group(1) not in ("'",):
        return [*lead, match.group(1), match.group(2), *tail]
    return [*lead, word, *tail]


def _keeps_period(word: str) -> bool:
    stem = word.rstrip(".").lower()
    return bool(_ACRONYM.match(word)) or stem in _ABBREVIATIONS or word == "."
