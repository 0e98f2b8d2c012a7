"""The shapes data set: deterministic, disjoint splits, faithful pixels, exact captions, fair scoring."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mgpt4.data import synthetic
from mgpt4.data.synthetic import (
    COLOURS,
    GRID,
    POSITIONS,
    SHAPES,
    make_samples,
    parse_caption,
    read_image_folder,
    score,
    write_image_folder,
)
from mgpt4.errors import DataError, UsageError


@pytest.fixture(scope="module")
def train():
    return make_samples(300, seed=0, split="train")


def _digest(sample) -> str:
    return hashlib.sha1(sample.image.tobytes()).hexdigest()


def test_deterministic_and_prefix_stable(train):
    again = make_samples(50, seed=0, split="train")
    assert [_digest(s) for s in again] == [_digest(s) for s in train[:50]]
    assert [s.caption for s in again] == [s.caption for s in train[:50]]
    other = make_samples(50, seed=1, split="train")
    assert [s.caption for s in other] != [s.caption for s in again]


def test_splits_are_disjoint(train):
    test = make_samples(300, seed=0, split="test")
    assert {s.key for s in train}.isdisjoint(s.key for s in test)
    assert {_digest(s) for s in train}.isdisjoint(_digest(s) for s in test)
    assert [s.caption for s in test[:50]] != [s.caption for s in train[:50]]
    with pytest.raises(UsageError, match="split"):
        make_samples(1, split="valid")


def test_images_and_attribute_coverage(train):
    assert all(s.image.mode == "RGB" and s.image.size == (64, 64) for s in train)
    assert make_samples(1, image_size=96)[0].image.size == (96, 96)
    objects = [o for s in train for o in s.attributes["shapes"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["position"] for o in objects} == set(POSITIONS)
    two = sum(s.attributes["count"] == 2 for s in train) / len(train)
    assert 0.2 < two < 0.4
    assert all(s.attributes["count"] == len(s.attributes["shapes"]) for s in train)


def test_pixels_match_attributes(train):
    """Each single shape sits in its grid cell, in its colour, at least a quarter of the side wide."""
    centres = {name: (x, y) for name, x, y in GRID}
    singles = [s for s in train if s.attributes["count"] == 1]
    for sample in singles:
        pixels = np.asarray(sample.image).astype(int)
        obj = sample.attributes["shapes"][0]
        x, y = (int(c * 64) for c in centres[obj["position"]])
        assert np.abs(pixels[y, x] - COLOURS[obj["colour"]]).max() < 45, (sample.key, pixels[y, x])
        background = pixels[0, 0] if obj["position"] != "top left" else pixels[63, 63]
        assert background.min() > 225 and np.ptp(background) < 4
        ink = np.argwhere(np.abs(pixels - background).sum(axis=2) > 60)
        height, width = ink.max(axis=0) - ink.min(axis=0) + 1
        assert width >= 15 and height >= 15, (sample.key, width, height)  # 1/4 side, less AA edge


def test_caption_grammar_and_vocabulary(train):
    vocab = set(SHAPES) | set(COLOURS) | {"a", "an", "and", "at", "on", "in", "the", "top", "bottom"}
    vocab |= {"left", "right", "center"}
    for sample in train:
        assert set(sample.caption.split()) <= vocab, sample.caption
        assert sample.caption == synthetic.caption_for(sample.attributes)
        assert sample.detailed.startswith("The image shows ") and sample.detailed.endswith(".")
    one = next(
        s for s in train if s.attributes["count"] == 1 and s.attributes["shapes"][0]["position"] == "top left"
    )
    obj = one.attributes["shapes"][0]
    article = "an" if obj["colour"] == "orange" else "a"
    assert one.caption == f"{article} {obj['colour']} {obj['shape']} at the top left"
    assert f"{obj['shape']} in the top left corner." in one.detailed
    two = next(
        s for s in train if s.attributes["count"] == 2 and s.attributes["shapes"][0]["position"] == "left"
    )
    assert " on the left and " in two.caption and two.caption.endswith(" on the right")
    assert two.detailed.startswith("The image shows two shapes on a plain white background. There is ")


def test_parse_round_trips_both_grammars(train):
    for sample in train:
        assert parse_caption(sample.caption) == sample.attributes
        assert parse_caption(sample.detailed) == sample.attributes


def test_parse_is_tolerant():
    parsed = parse_caption("A GREEN Triangle, on the right; and blue squares (left)!")
    assert parsed == {
        "count": 2,
        "shapes": [
            {"shape": "triangle", "colour": "green", "position": "right"},
            {"shape": "square", "colour": "blue", "position": "left"},
        ],
    }
    assert (
        parse_caption("in the upper left corner there is a red star")["shapes"][0]["position"] == "top left"
    )
    assert parse_caption("a circle")["shapes"] == [{"shape": "circle", "colour": None, "position": None}]
    assert parse_caption("a red thing in the middle") is None
    assert parse_caption("") is None


def test_score_perfect_partial_and_reordered(train):
    samples = train[:40]
    assert score([s.caption for s in samples], samples) == {
        "shape": 1.0, "colour": 1.0, "position": 1.0, "count": 1.0,
        "correct": 1.0, "exact": 1.0, "parsed": 1.0, "accuracy": 1.0, "n": 40,
    }  # fmt: skip
    empty = score([""] * 40, samples)
    assert empty["shape"] == empty["count"] == empty["exact"] == empty["parsed"] == 0.0

    two = next(
        s for s in train if s.attributes["count"] == 2 and s.attributes["shapes"][0]["position"] == "left"
    )
    first, second = two.caption.split(" and ")
    swapped = score([f"{second} and {first}"], [two])
    assert swapped["shape"] == swapped["colour"] == swapped["position"] == swapped["correct"] == 1.0
    assert swapped["exact"] == 0.0

    one = next(s for s in train if s.attributes["count"] == 1)
    obj = one.attributes["shapes"][0]
    wrong = next(c for c in COLOURS if c != obj["colour"])
    result = score([one.caption.replace(obj["colour"], wrong)], [one])
    assert (result["shape"], result["colour"], result["position"], result["correct"]) == (1.0, 0.0, 1.0, 0.0)
    assert result["accuracy"] == 0.75  # the mean of shape, colour, position and count
    only_first = score([first], [two])
    assert only_first["shape"] == 0.5 and only_first["count"] == 0.0
    with pytest.raises(ValueError, match="predictions"):
        score(["a"], samples)


def test_image_folder_round_trip(tmp_path, train):
    index = write_image_folder(train[:5], tmp_path / "shapes")
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir()) == sorted(
        [f"{s.key}.jpg" for s in train[:5]] + ["captions.jsonl"]
    )
    back = read_image_folder(index.parent)
    assert [(s.key, s.caption, s.detailed, s.attributes) for s in back] == [
        (s.key, s.caption, s.detailed, s.attributes) for s in train[:5]
    ]
    diff = np.abs(np.asarray(back[0].image, dtype=int) - np.asarray(train[0].image, dtype=int)).mean()
    assert diff < 3  # JPEG quality 95
    with pytest.raises(DataError, match="captions.jsonl"):
        read_image_folder(tmp_path)
