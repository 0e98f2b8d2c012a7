"""Each caption filter accepts a good description and rejects its own kind of failure."""

from __future__ import annotations

import pytest

from mgpt4.curate.filters import (
    FILTER_NAMES,
    FilterConfig,
    duplicate,
    fixer_commentary,
    non_english,
    normalize,
    refusal,
    repetition,
    run_filters,
    too_short,
)
from mgpt4.errors import ConfigError

GOOD = (
    "The image shows a red circle in the top left corner of a plain gray background. "
    "A small blue square sits near the bottom right, and there is nothing else in the picture."
)
CFG = FilterConfig()


def test_good_caption_passes_every_filter():
    verdicts = run_filters(GOOD, GOOD, set(), CFG, fixer_ran=True)
    assert [v.name for v in verdicts] == list(FILTER_NAMES)
    assert all(v.passed for v in verdicts), verdicts


def test_too_short_counts_words():
    assert not too_short("A red circle.", CFG).passed
    assert "3 words" in too_short("A red circle.", CFG).reason
    assert too_short("one two three four five six seven eight", CFG).passed
    assert not too_short("one two three four five six seven eight", FilterConfig(min_words=9)).passed


def test_repetition_rejects_repeated_sentences_and_looping_ngrams():
    repeated = "The image shows a red circle. It is on the left. The image shows a red circle."
    verdict = repetition(repeated, CFG)
    assert not verdict.passed and "sentence repeated 2×" in verdict.reason
    looping = "there is a red circle and " * 6 + "a square."
    verdict = repetition(looping, CFG)
    assert not verdict.passed and "4-grams repeated" in verdict.reason
    assert repetition(GOOD, CFG).passed


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        (
            "The image shows \x17\x11 a red ��� circle @@@ ### ^^^ in the corner of the picture.",
            "meaningless",
        ),
        ("这张图片显示了一个红色的圆圈在左上角的灰色背景上。", "meaningless"),
        (
            "rectangle shapes see rectangle color bothmagenta English magenta blue colorollowing",
            "function words",
        ),
    ],
)
def test_non_english_rejects_symbols_other_scripts_and_word_salad(text, reason):
    verdict = non_english(text, CFG)
    assert not verdict.passed and reason in verdict.reason


def test_non_english_accepts_accented_latin_words():
    assert non_english(GOOD + " A café sign hangs on the wall of the building.", CFG).passed


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I cannot see the image you provided.",
        "As an AI language model I am unable to describe pictures.",
        "I apologize, there is no image in this conversation.",
    ],
)
def test_refusal_phrases_are_rejected(text):
    assert not refusal(text).passed


def test_refusal_passes_plain_description():
    assert refusal(GOOD).passed


@pytest.mark.parametrize(
    "fixed",
    [
        "Sure! " + GOOD,
        "Here is the corrected paragraph: " + GOOD,
        "Corrected paragraph: " + GOOD,
        GOOD + " I have removed the repeating sentences.",
    ],
)
def test_fixer_commentary_phrases(fixed):
    verdict = fixer_commentary(fixed, GOOD, CFG)
    assert not verdict.passed and "commentary" in verdict.reason


def test_fixer_garbage_or_unrelated_text_is_rejected():
    unrelated = "Quantum chromodynamics describes strong interactions between quarks and gluons today."
    assert "come from the description" in fixer_commentary(unrelated, GOOD, CFG).reason
    assert "no words" in fixer_commentary("�\x07 12 ##", GOOD, CFG).reason
    longer = GOOD + " " + GOOD.replace("red", "green").replace("blue", "yellow")
    assert "longer" in fixer_commentary(longer, GOOD, CFG).reason


def test_fixer_commentary_only_applies_to_llm_fixers():
    assert fixer_commentary("Sure! here it is", GOOD, CFG, fixer_ran=False).passed
    trimmed = "The image shows a red circle in the top left corner of a plain gray background."
    assert fixer_commentary(trimmed, GOOD, CFG).passed


def test_duplicate_compares_normalized_text():
    seen = {normalize(GOOD)}
    assert not duplicate(GOOD.upper().replace(",", ""), seen).passed
    assert duplicate(GOOD + " Also a star.", seen).passed
    assert not duplicate("Shape number 2 is red.", {normalize("shape number 2 is red")}).passed
    assert duplicate("Shape number 3 is red.", {normalize("shape number 2 is red")}).passed


def test_skip_turns_a_filter_off_and_unknown_names_fail():
    seen = {normalize(GOOD)}
    verdicts = run_filters(GOOD, GOOD, seen, FilterConfig(skip=["duplicate"]), fixer_ran=False)
    assert all(v.passed for v in verdicts)
    assert not run_filters(GOOD, GOOD, seen, CFG, fixer_ran=False)[-1].passed
    with pytest.raises(ConfigError, match="filters.skip"):
        FilterConfig(skip=["dupe"]).validate()
