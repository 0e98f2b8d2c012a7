"""VQA answer matching: the answer normalisation of the VQA v2 evaluation script, and its accuracy.

Facts from the VQA evaluation code (github.com/GT-Vision-Lab/VQA, ``vqaEval.py``):

- punctuation: ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are deleted when the text has one next
  to a space (or a digit-comma-digit group), else replaced by a space; periods not followed by a digit
  are deleted (so "3.5" stays);
- words: lower-cased; number words zero..ten (and "none") become digits; articles a/an/the are dropped;
  contractions written without their apostrophes ("dont", "isnt", "couldntve") get them back;
- accuracy: ``min(1, humans who gave the answer / 3)``, averaged over the 10 ways of leaving one human
  out — meaningful with VQA's 10 answers per question.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The script's table maps apostrophe-less spellings back to these forms (only unambiguous ones: no
# "its", "well", "were"); every spelling with some of the apostrophes left out is a key.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
    "you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        marks = [i for i, char in enumerate(word) if char == "'"]
        for count in range(1, len(marks) + 1):
            for dropped in itertools.combinations(marks, count):
                table["".join(c for i, c in enumerate(word) if i not in dropped)] = word
    return table


_CONTRACTION_TABLE = _contraction_table()


def normalize_answer(text: str) -> str:
    """An answer in the VQA script's canonical form (``"Two dogs."`` → ``"2 dogs"``)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTION_TABLE.get(word, word))
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if delete or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _LONE_PERIOD.sub("", out)


def exact_match(answer: str, references: Sequence[str]) -> bool:
    """The normalised answer equals one of the normalised references."""
    normalized = normalize_answer(answer)
    return any(normalized == normalize_answer(r) for r in references)


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """The VQA accuracy of one answer: min(1, matches / 3) averaged over leave-one-out reference sets."""
    if not references:
        return 0.0
    normalized = normalize_answer(answer)
    matches = [normalize_answer(r) == normalized for r in references]
    total = sum(matches)
    return sum(min(1.0, (total - hit) / 3) for hit in matches) / len(matches)
