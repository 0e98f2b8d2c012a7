"""``pope``: object-presence yes/no questions (POPE, Li et al. 2023), scored as the paper scores them.

Data: POPE's JSON lines, one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
     image?", "label": "yes"}

(``question`` is accepted for ``text``, ``answer`` for ``label``); image paths are relative to
``images`` or the file's folder. Metrics: accuracy, precision, recall, F1 and the yes-ratio.
"""

from __future__ import annotations

from typing import Any

from mgpt4.errors import UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.metrics.yesno import parse_yes_no, pope_metrics
from mgpt4.eval.tasks.base import (
    Task,
    TaskData,
    TaskScores,
    check_unique,
    fingerprint,
    image_item,
    images_root,
    read_json_lines,
    require_file,
    text_field,
)

# LLaVA's POPE prompt (llava/eval/model_vqa_loader.py usage in scripts/v1_5/eval/pope.sh).
DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."


def load(cfg: EvalConfig) -> TaskData:
    path = require_file(cfg.data, "pope", "POPE JSON lines: question_id, image, text, label")
    root = images_root(cfg, path)
    items, seen = [], set()
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        label = (text_field(row, ("label", "answer"), where) or "").strip().lower()
        if label not in ("yes", "no"):
            raise UsageError(f"{where}: label must be yes or no, got {label!r}")
        item_id = text_field(row, ("question_id", "id"), where, required=False) or str(number)
        check_unique(item_id, seen, where)
        image = text_field(row, ("image",), where)
        question = text_field(row, ("text", "question"), where)
        items.append(image_item(item_id, root, image, reference=label, question=question))
    return TaskData(iter(items), len(items), fingerprint(path, [path], [i.image for i in items], len(items)))


def score(records: list[dict[str, Any]], cfg: EvalConfig) -> TaskScores:
    parsed = [parse_yes_no(r["answer"]) for r in records]
    labels = [r["reference"] for r in records]
    per_item = {
        r["id"]: {"parsed": p, "correct": int(p == label)}
        for r, p, label in zip(records, parsed, labels, strict=True)
    }
    metrics: dict[str, Any] = {**pope_metrics(parsed, labels), "n": len(records)}
    empty = sum(not r["answer"].strip() for r in records)
    notes = [f"{empty} empty answers were read as yes (POPE's rule: no negation = yes)"] if empty else []
    return TaskScores(per_item, metrics, notes)


TASK = Task(name="pope", load=load, score=score, default_prompt=DEFAULT_PROMPT, primary="correct")
