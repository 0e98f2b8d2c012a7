"""Known-answer tests for every eval metric: COCO caption scores pinned against the reference
implementation, the Java-free tokenizer against Java's, POPE counts, VQA normalisation, judge replies."""

from __future__ import annotations

import shutil

import pytest
from helpers.eval_fixtures import (
    ANSWERS,
    REFERENCE_PER_ITEM,
    REFERENCE_SCORES,
    REFERENCES,
    TOKENIZER_CASES,
    reference_caption_scores,
)

from mgpt4.eval.metrics.captions import score_captions
from mgpt4.eval.metrics.tokenize import coco_tokenize
from mgpt4.eval.metrics.vqa import exact_match, normalize_answer, vqa_accuracy
from mgpt4.eval.metrics.yesno import parse_yes_no, pope_metrics
from mgpt4.eval.tasks.judge import parse_rating

pytest.importorskip("pycocoevalcap", reason="the captions metrics need the `eval` extra (pycocoevalcap)")
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="the reference tokenizer/METEOR need java"
)


@pytest.mark.parametrize(("caption", "expected"), TOKENIZER_CASES)
def test_coco_tokenize_matches_the_java_ptb_tokenizer(caption, expected):
    assert coco_tokenize(caption) == expected


def test_caption_scores_equal_the_pinned_reference_numbers():
    result = score_captions(ANSWERS, REFERENCES, meteor=False)
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l"):
        assert result.corpus[name] == pytest.approx(REFERENCE_SCORES[name], rel=1e-12, abs=1e-15), name
    for key, (cider, bleu_4, rouge) in REFERENCE_PER_ITEM.items():
        item = result.per_item[key]
        assert (item["cider_d"], item["bleu_4"], item["rouge_l"]) == pytest.approx((cider, bleu_4, rouge))
    assert result.corpus["meteor"] is None and "meteor=false" in result.notes[0]


def test_caption_scores_say_plainly_when_java_is_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = score_captions(ANSWERS, REFERENCES, meteor=True)
    assert result.corpus["meteor"] is None
    assert result.notes == ["METEOR not computed: it needs `java` on PATH (METEOR 1.5 is a Java program)"]
    assert result.corpus["cider_d"] == pytest.approx(REFERENCE_SCORES["cider_d"])


@needs_java
def test_pinned_numbers_are_what_the_live_reference_pipeline_gives():
    """pycocoevalcap's own pipeline, Java tokenizer included, run now: the pinned numbers (no METEOR)."""
    corpus, per_item = reference_caption_scores(meteor=False)
    assert corpus == pytest.approx({k: v for k, v in REFERENCE_SCORES.items() if k != "meteor"}, rel=1e-12)
    for key, scores in REFERENCE_PER_ITEM.items():
        assert per_item[key] == pytest.approx(scores)


@needs_java
@pytest.mark.slow  # METEOR's JVM loads its paraphrase table: ~40 s on 2 busy cores
def test_meteor_equals_the_pinned_reference():
    ours = score_captions(ANSWERS, REFERENCES, meteor=True)
    assert ours.corpus["meteor"] == pytest.approx(REFERENCE_SCORES["meteor"], rel=1e-12)
    assert ours.notes == [] and set(ours.per_item["1"]) == {"cider_d", "bleu_4", "rouge_l", "meteor"}


def test_caption_scores_react_to_the_answer():
    better = dict(ANSWERS, **{"5": "A woman holding an umbrella in the rain."})
    assert score_captions(better, REFERENCES, meteor=False).corpus["cider_d"] > REFERENCE_SCORES["cider_d"]


def test_parse_yes_no():
    yes = ["Yes", "yes.", "Yes, there is a snowboard in the image.", "There is a dog.",
           "Yes, there is no doubt.", "The image shows a red circle.", "YES!"]  # fmt: skip
    no = ["No", "no, there is not.", "There is no snowboard in the image.", "There isn't a dog.",
          "I cannot see any car.", "Not in this picture.", "None.",
          "No. There is a cat though, yes."]  # fmt: skip
    assert [parse_yes_no(a) for a in yes] == ["yes"] * len(yes)
    assert [parse_yes_no(a) for a in no] == ["no"] * len(no)
    assert parse_yes_no("There is a dog. There is no cat.") == "yes"  # POPE reads the first sentence only


def test_pope_metrics_on_known_counts():
    labels = ["yes"] * 6 + ["no"] * 4
    predictions = ["yes", "yes", "yes", "yes", "no", "no"] + ["yes", "no", "no", "no"]  # tp 4 fn 2 fp 1 tn 3
    metrics = pope_metrics(predictions, labels)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (4, 2, 1, 3)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["precision"] == pytest.approx(0.8)
    assert metrics["recall"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert metrics["yes_ratio"] == pytest.approx(0.5)
    assert pope_metrics(["no"] * 2, ["yes", "no"])["precision"] == 0.0  # no yes predicted: no division by 0
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("The answer is: yes!", "answer is: yes"),  # "!" after a non-space is replaced by a space
        ("yes", "yes"),
        ("  Yes\n", "yes"),
        ("dont", "don't"),
        ("couldntve", "couldn't've"),
        ("isnt it", "isn't it"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000 people", "1000 people"),  # digit,digit: punctuation deleted, not spaced
        ("red, white", "red white"),
        ("black-and-white", "black and white"),
        ("an apple", "apple"),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("the cat's toy", "cat's toy"),
    ],
)
def test_vqa_normalisation(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_exact_match_and_accuracy():
    assert exact_match("Two.", ["2"]) and exact_match("the Red bus", ["red bus", "blue"])
    assert not exact_match("red and blue", ["red"])
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # 2·(1/3) + 8·(2/3), over 10
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("4", ["2"] * 10) == 0.0


@pytest.mark.parametrize(
    ("reply", "rating", "reason"),
    [
        ('{"score": 7, "reason": "Mostly right."}', 7, "Mostly right."),
        ('```json\n{"score": "10", "reason": "Exact."}\n```', 10, "Exact."),
        ('{"rating": 3.0, "reason": "Wrong colour"}', 3, "Wrong colour"),
        ("Score: 4. The answer misses the dog.", 4, "Score: 4. The answer misses the dog."),
        ("8/10", 8, "8/10"),
        ('{"score": 11, "reason": "x"}', None, '{"score": 11, "reason": "x"}'),
        ("I cannot rate this.", None, "I cannot rate this."),
    ],
)
def test_judge_reply_parsing(reply, rating, reason):
    assert parse_rating(reply) == (rating, reason)
