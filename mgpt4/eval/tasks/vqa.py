"""``vqa``: open questions with reference answers, scored by VQA-normalised exact match.

Data: JSON lines, one question per line::

    {"question_id": 7, "image": "val2014/COCO_val2014_000000000042.jpg", "question": "What color is
     the bus?", "answers": ["red", "red", "dark red", ...]}

``answers`` may hold strings or VQA annotation objects (``{"answer": ...}``); a single ``answer``
string works too. Metrics: ``exact_match`` (the normalised answer equals a normalised reference) and,
when every question has at least 3 references (VQA v2 has 10), the official ``vqa_accuracy``.
"""

from __future__ import annotations

from typing import Any

from mgpt4.errors import UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.metrics.vqa import exact_match, normalize_answer, vqa_accuracy
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

# LLaVA's short-answer VQA prompt (scripts/v1_5/eval/vqav2.sh → llava_vqav2_mscoco_test-dev2015).
DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."
MIN_REFERENCES_FOR_VQA_ACCURACY = 3  # min(1, matches / 3) needs ≥ 3 humans to reach 1


def load(cfg: EvalConfig) -> TaskData:
    path = require_file(cfg.data, "vqa", "JSON lines: question_id, image, question, answers")
    root = images_root(cfg, path)
    items, seen = [], set()
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        item_id = text_field(row, ("question_id", "id"), where, required=False) or str(number)
        check_unique(item_id, seen, where)
        answers = reference_answers(row, where)
        question = text_field(row, ("question", "text"), where)
        items.append(
            image_item(
                item_id, root, text_field(row, ("image",), where), reference=answers, question=question
            )
        )
    return TaskData(iter(items), len(items), fingerprint(path, [path], [i.image for i in items], len(items)))


def reference_answers(row: dict[str, Any], where: str) -> list[str]:
    """The reference answers of a row: ``answers`` (strings or ``{"answer"}`` objects) or ``answer``.

    Raises:
        UsageError: neither is present, or it holds something else.
    """
    if "answers" in row:
        raw = row["answers"]
        if not isinstance(raw, list) or not raw:
            raise UsageError(f"{where}: 'answers' must be a non-empty list")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not all(isinstance(a, str) for a in answers):
            raise UsageError(f"{where}: 'answers' must hold strings or {{\"answer\": text}} objects")
        return answers
    answer = text_field(row, ("answer", "reference"), where)
    return [answer]


def score(records: list[dict[str, Any]], cfg: EvalConfig) -> TaskScores:
    per_item = {}
    for record in records:
        references = record["reference"]
        per_item[record["id"]] = {
            "exact": int(exact_match(record["answer"], references)),
            "vqa_accuracy": vqa_accuracy(record["answer"], references),
            "normalized": normalize_answer(record["answer"]),
        }
    count = len(records)
    metrics: dict[str, Any] = {
        "exact_match": sum(s["exact"] for s in per_item.values()) / count if count else None,
        "vqa_accuracy": None,
        "n": count,
    }
    notes = []
    if count and all(len(r["reference"]) >= MIN_REFERENCES_FOR_VQA_ACCURACY for r in records):
        metrics["vqa_accuracy"] = sum(s["vqa_accuracy"] for s in per_item.values()) / count
    elif count:
        notes.append(
            f"vqa_accuracy left out: it needs ≥ {MIN_REFERENCES_FOR_VQA_ACCURACY} references per question"
        )
    return TaskScores(per_item, metrics, notes)


TASK = Task(name="vqa", load=load, score=score, default_prompt=DEFAULT_PROMPT, primary="exact")
