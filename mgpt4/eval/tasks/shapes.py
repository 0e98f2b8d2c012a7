"""``shapes``: the built-in synthetic set, scored per attribute exactly as ``mgpt4 demo`` scores it.

Data: a folder written by ``data.synthetic.write_image_folder`` (``captions.jsonl`` + ``KEY.jpg``; the
demo leaves one at ``runs/demo/data/test``), or None for the built-in set: the first 200 images of the
test split with seed 1 — the demo draws with seed 0, so no demo model has seen these images. Scoring is
``synthetic.score`` (shape, colour, position, count, their mean ``accuracy``, all-correct, exact), so
CI can evaluate the demo's model on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mgpt4.data import synthetic
from mgpt4.errors import UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.tasks.base import (
    Task,
    TaskData,
    TaskScores,
    check_unique,
    fingerprint,
    image_item,
    read_json_lines,
    require_file,
    text_field,
)

INDEX = "captions.jsonl"
BUILTIN_IMAGES = 200
BUILTIN_SEED = 1  # not the demo's seed 0: images no demo model trained on
BUILTIN_FOLDER = "shapes-data"


def load(cfg: EvalConfig) -> TaskData:
    folder = Path(cfg.data) if cfg.data else builtin_folder(Path(cfg.output_dir()))
    folder = require_file(str(folder), "shapes", "a folder with captions.jsonl (e.g. runs/demo/data/test)")
    index = folder / INDEX
    if not index.is_file():
        raise UsageError(
            f"{index}: not found; shapes data is a folder written by the demo (runs/demo/data/test)"
        )
    items, seen = [], set()
    for number, row in read_json_lines(index):
        where = f"{index}:{number}"
        key = text_field(row, ("key",), where)
        check_unique(key, seen, where)
        attributes = row.get("attributes")
        if not isinstance(attributes, dict) or not isinstance(attributes.get("shapes"), list):
            raise UsageError(f'{where}: \'attributes\' must be {{"count", "shapes": [...]}}')
        reference = {
            "caption": text_field(row, ("caption",), where),
            "detailed": text_field(row, ("detailed",), where),
            "attributes": attributes,
        }
        items.append(image_item(key, folder, text_field(row, ("image",), where), reference=reference))
    return TaskData(
        iter(items), len(items), fingerprint(folder, [index], [i.image for i in items], len(items))
    )


def builtin_folder(out: Path) -> Path:
    """The built-in test images, written once into ``out/shapes-data``."""
    folder = out / BUILTIN_FOLDER
    if not (folder / INDEX).is_file():
        # Written aside and renamed: a killed run never leaves a half-written set behind.
        partial = out / f".{BUILTIN_FOLDER}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        samples = synthetic.make_samples(BUILTIN_IMAGES, seed=BUILTIN_SEED, split="test")
        synthetic.write_image_folder(samples, partial)
        partial.rename(folder)
    return folder


def _sample(record: dict[str, Any]) -> synthetic.ShapeSample:
    reference = record["reference"]
    return synthetic.ShapeSample(
        record["id"], None, reference["caption"], reference["detailed"], reference["attributes"]
    )


def score(records: list[dict[str, Any]], cfg: EvalConfig) -> TaskScores:
    samples = [_sample(r) for r in records]
    answers = [r["answer"] for r in records]
    per_item = {}
    for record, answer, sample in zip(records, answers, samples, strict=True):
        item = synthetic.score([answer], [sample])
        per_item[record["id"]] = {k: v for k, v in item.items() if k != "n"}
    metrics = synthetic.score(answers, samples) if records else {"n": 0}
    return TaskScores(per_item, metrics)


TASK = Task(name="shapes", load=load, score=score, default_prompt=None, primary="accuracy")
