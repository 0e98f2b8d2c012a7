"""The built-in "shapes" data set: small images of one or two coloured shapes with exact captions.

`mgpt4 demo` trains the micro preset on it from scratch on CPU and measures the result, so the task is
kept learnable in minutes: 4 shapes, 6 saturated colours, 9 grid positions, a fixed grammar and shapes
at least a quarter of the image side. Every image has two texts built from the same attributes:

    caption   "a red circle at the top left"
              "a blue square on the left and a green triangle on the right"
    detailed  "The image shows a red circle in the top left corner. There is one shape on a plain white
               background."

    samples = make_samples(200, seed=0, split="train")
    result = score(predicted_texts, samples)   # {"shape": 0.9, "colour": ..., "exact": ...}
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mgpt4.data.images import open_image
from mgpt4.errors import DataError, UsageError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 185),
    "orange": (245, 130, 20),
}
# 3x3 grid in reading order: (name, centre x, centre y as a fraction of the side).
GRID = (
    ("top left", 0.21, 0.21), ("top", 0.5, 0.21), ("top right", 0.79, 0.21),
    ("left", 0.21, 0.5), ("center", 0.5, 0.5), ("right", 0.79, 0.5),
    ("bottom left", 0.21, 0.79), ("bottom", 0.5, 0.79), ("bottom right", 0.79, 0.79),
)  # fmt: skip
# Two-shape layouts: the first shape named in the caption comes first in reading order.
PAIR_LAYOUTS = ((("left", 0.27, 0.5), ("right", 0.73, 0.5)), (("top", 0.5, 0.27), ("bottom", 0.5, 0.73)))
POSITIONS = tuple(name for name, _, _ in GRID)

_SHORT_WHERE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
_DETAILED_WHERE = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left side", "center": "in the center", "right": "on the right side",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}  # fmt: skip
_SPLITS = {"train": 0, "test": 1}
ATTRIBUTES = ("shape", "colour", "position", "count")  # `score`'s "accuracy" is their mean
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges and sub-pixel jitter


@dataclasses.dataclass
class ShapeSample:
    """One synthetic image with its exact texts.

    ``attributes`` is ``{"count": n, "shapes": [{"shape", "colour", "position"}, ...]}`` with the
    shapes in caption (reading) order.
    """

    key: str
    image: Image.Image
    caption: str
    detailed: str
    attributes: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def make_samples(
    n: int, seed: int = 0, split: str = "train", image_size: int = 64, two_shape_fraction: float = 0.3
) -> list[ShapeSample]:
    """Generate ``n`` samples deterministically; ``make_samples(k)`` is a prefix of ``make_samples(n>k)``.

    Args:
        n: number of samples.
        seed: data set seed.
        split: ``"train"`` or ``"test"``. The splits use different random streams, and the background
            level's parity encodes the split, so no test image can equal a train image.
        image_size: side of the square RGB images in pixels.
        two_shape_fraction: probability that an image holds two shapes instead of one.

    Returns:
        The samples, keyed ``"{split}-{index:06d}"``.
    """
    return [make_sample(index, seed, split, image_size, two_shape_fraction) for index in range(n)]


def make_sample(
    index: int, seed: int = 0, split: str = "train", image_size: int = 64, two_shape_fraction: float = 0.3
) -> ShapeSample:
    """Sample number ``index`` of `make_samples` (same arguments), made on its own."""
    if split not in _SPLITS:
        raise UsageError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs.
    rng = random.Random(f"mgpt4-shapes:{seed}:{split}:{index}")
    return _make_sample(rng, f"{split}-{index:06d}", _SPLITS[split], image_size, two_shape_fraction)


def _make_sample(rng: random.Random, key: str, split_id: int, size: int, two_fraction: float) -> ShapeSample:
    if rng.random() < two_fraction:
        slots = list(rng.choice(PAIR_LAYOUTS))
        jitter_xy = (0.0, 0.06) if slots[0][0] == "left" else (0.06, 0.0)  # slide along the free axis
    else:
        slots = [rng.choice(GRID)]
        jitter_xy = (0.025, 0.025)
    shapes = [
        {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "position": p} for p, _, _ in slots
    ]
    # Light background; even levels for train, odd for test.
    level = 2 * rng.randint(116, 126) + split_id
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (level, level, level))
    draw = ImageDraw.Draw(canvas)
    for attrs, (_, cx, cy) in zip(shapes, slots, strict=True):
        radius = rng.uniform(0.145, 0.165) * big  # every shape spans >= 25% of the side
        x = (cx + rng.uniform(-1, 1) * jitter_xy[0]) * big
        y = (cy + rng.uniform(-1, 1) * jitter_xy[1]) * big
        fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[attrs["colour"]])
        _draw_shape(draw, attrs["shape"], x, y, radius, fill)
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    attributes = {"count": len(shapes), "shapes": shapes}
    return ShapeSample(key, image, caption_for(attributes), detailed_for(attributes), attributes)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        half = 0.88 * r  # a square as wide as the circle looks bigger; keep areas comparable
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "triangle":
        # Slightly larger than r: a triangle covers less area than its bounding circle.
        draw.polygon([(x, y - 1.1 * r), (x - 1.05 * r, y + 0.8 * r), (x + 1.05 * r, y + 0.8 * r)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = 1.1 * r if k % 2 == 0 else 0.5 * r
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise AssertionError(f"unknown shape {shape}")


def _phrase(s: dict[str, Any], where: dict[str, str]) -> str:
    article = "an" if s["colour"][0] in "aeiou" else "a"  # "an orange circle"
    return f"{article} {s['colour']} {s['shape']} {where[s['position']]}"


def caption_for(attributes: dict[str, Any]) -> str:
    """The short caption of an attribute dict, e.g. ``"a red circle at the top left"``."""
    return " and ".join(_phrase(s, _SHORT_WHERE) for s in attributes["shapes"])


def detailed_for(attributes: dict[str, Any]) -> str:
    """The two-sentence stage-2 style description of an attribute dict."""
    shapes = attributes["shapes"]
    if len(shapes) == 1:
        where = _phrase(shapes[0], _DETAILED_WHERE)
        return f"The image shows {where}. There is one shape on a plain white background."
    parts = " and ".join(_phrase(s, _DETAILED_WHERE) for s in shapes)
    return f"The image shows two shapes on a plain white background. There is {parts}."


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_image_folder(samples: Sequence[ShapeSample], folder: str | Path) -> Path:
    """Write ``KEY.jpg`` (JPEG quality 95) per sample and one ``captions.jsonl`` describing them.

    Args:
        samples: samples from `make_samples`.
        folder: output folder, created if missing.

    Returns:
        The path of ``captions.jsonl`` (fields ``key``, ``image``, ``caption``, ``detailed``,
        ``attributes``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "captions.jsonl"
    with open(index, "w", encoding="utf-8") as out:
        for sample in samples:
            sample.image.save(folder / f"{sample.key}.jpg", quality=95)
            row = {"key": sample.key, "image": f"{sample.key}.jpg", "caption": sample.caption,
                   "detailed": sample.detailed, "attributes": sample.attributes}  # fmt: skip
            out.write(json.dumps(row) + "\n")
    return index


def read_image_folder(folder: str | Path) -> list[ShapeSample]:
    """Read back a folder written by `write_image_folder` (images loaded as RGB)."""
    index = Path(folder) / "captions.jsonl"
    if not index.is_file():
        raise DataError(f"{index}: not found; write the folder with write_image_folder first")
    samples = []
    with open(index, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                image = open_image(index.parent / row["image"])
                samples.append(
                    ShapeSample(row["key"], image, row["caption"], row["detailed"], row["attributes"])
                )
            except (OSError, ValueError, KeyError, DataError) as exc:
                raise DataError(f"{index}:{number}: unreadable sample ({exc})") from exc
    return samples


# --------------------------------------------------------------------------------------------------
# Parsing and scoring
# --------------------------------------------------------------------------------------------------

_POSITION_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "left": "left",
                   "right": "right", "center": "center", "centre": "center", "middle": "center"}  # fmt: skip
_ROW = {"top": 0, "bottom": 2}
_COL = {"left": 0, "right": 2}


def normalize_text(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: the form `score` compares exactly."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _shape_word(word: str) -> str | None:
    if word in SHAPES:
        return word
    if word.endswith("s") and word[:-1] in SHAPES:  # "circles"
        return word[:-1]
    return None


def _position(words: Sequence[str]) -> str | None:
    found = [_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS]
    vertical = next((w for w in found if w in ("top", "bottom")), None)
    horizontal = next((w for w in found if w in ("left", "right")), None)
    if vertical or horizontal:
        return " ".join(w for w in (vertical, horizontal) if w)
    return "center" if "center" in found else None


def parse_caption(text: str) -> dict[str, Any] | None:
    """Read shape, colour and position words back out of a caption or a detailed description.

    Tolerant of case, punctuation and plurals. Each shape word makes one object; its colour is the
    colour word just before it, its position the position words after it (up to the next object), or
    before it when none follow.

    Returns:
        ``{"count", "shapes": [{"shape", "colour", "position"}]}`` (colour/position may be None), or
        None when the text names no shape.
    """
    words = normalize_text(text).split()
    objects: list[tuple[int, int]] = []  # (start index incl. colour word, shape word index)
    for i, word in enumerate(words):
        if _shape_word(word):
            start = i - 1 if i > 0 and words[i - 1] in COLOURS else i
            objects.append((start, i))
    if not objects:
        return None
    shapes = []
    for k, (start, i) in enumerate(objects):
        end = objects[k + 1][0] if k + 1 < len(objects) else len(words)
        before_from = objects[k - 1][1] + 1 if k > 0 else 0
        position = _position(words[i + 1 : end]) or _position(words[before_from:start])
        colour = words[start] if start < i else None
        shapes.append({"shape": _shape_word(words[i]), "colour": colour, "position": position})
    return {"count": len(shapes), "shapes": shapes}


def _reading_order(shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort objects top→bottom, left→right when every position is known; else keep text order."""
    if any(s["position"] is None for s in shapes):
        return shapes

    def key(s: dict[str, Any]) -> tuple[int, int]:
        parts = s["position"].split()
        row = next((_ROW[p] for p in parts if p in _ROW), 1)
        return row, next((_COL[p] for p in parts if p in _COL), 1)

    return sorted(shapes, key=key)


def score(predictions: Sequence[str], samples: Sequence[ShapeSample]) -> dict[str, float]:
    """Score generated texts against the samples' attributes.

    Objects are matched in reading order (top→bottom, left→right), so "a green triangle on the right
    and a blue square on the left" still scores both shapes. Per-attribute accuracies count objects
    (a missing predicted object is wrong); ``count`` and ``correct`` count images.

    Args:
        predictions: one generated text per sample (short caption or detailed grammar).
        samples: the ground truth.

    Returns:
        ``shape``, ``colour``, ``position``: object-level accuracy; ``count``: right number of objects;
        ``accuracy``: the mean of those four (what `mgpt4 demo` and `mgpt4 eval shapes` report);
        ``correct``: every attribute of the image right; ``exact``: normalized text equals the caption
        or the detailed description; ``parsed``: fraction of texts naming any shape; ``n``: images.
    """
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    hits = {"shape": 0, "colour": 0, "position": 0}
    images = {"count": 0, "correct": 0, "exact": 0, "parsed": 0}
    objects = 0
    for text, sample in zip(predictions, samples, strict=True):
        truth = _reading_order(sample.attributes["shapes"])
        parsed = parse_caption(text)
        predicted = _reading_order(parsed["shapes"]) if parsed else []
        objects += len(truth)
        for k, true_obj in enumerate(truth):
            for attr in hits:
                hits[attr] += k < len(predicted) and predicted[k][attr] == true_obj[attr]
        images["parsed"] += parsed is not None
        images["count"] += len(predicted) == len(truth)
        images["correct"] += predicted == truth
        images["exact"] += normalize_text(text) in (
            normalize_text(sample.caption),
            normalize_text(sample.detailed),
        )
    n = max(len(samples), 1)
    result = {attr: hits[attr] / max(objects, 1) for attr in hits}
    result.update({name: value / n for name, value in images.items()})
    result["accuracy"] = sum(result[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    result["n"] = len(samples)
    return result
