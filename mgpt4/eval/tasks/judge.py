"""``judge``: an LLM rates each answer 1–10 against the question and a reference (MiniGPT-4 §4 used a
stronger LLM to judge answers; so do LLaVA-Bench and MM-Vet).

Data: JSON lines ``{"question_id"?, "image", "question", "reference"}`` (``answer`` or ``answers[0]``
also name the reference), or a ``cc_sbu_align`` folder (each image described, the caption is the
reference). The judge is any OpenAI-compatible ``/chat/completions`` endpoint, called through curate's
fixer client (timeouts, retries with backoff on 429/5xx, concurrent workers). The rubric below is
fixed and saved in scores.json; the judge's reason is kept per answer. A failed or unreadable rating is
journaled as such and asked again on the next run, without generating the answer again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgpt4.curate.fix import FixerConfig, OpenAIFixer, fix_many
from mgpt4.errors import DataError, UsageError
from mgpt4.eval.config import EvalConfig
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

JUDGE_RUBRIC = (
    "You grade the answers of a vision-language assistant. You cannot see the image; a reference answer "
    "written by someone who saw it is given instead. Rate the assistant's answer to the question from 1 "
    "to 10:\n"
    "10: correct and complete; agrees with the reference and adds nothing the reference contradicts.\n"
    "7-9: correct, with small omissions or imprecise details.\n"
    "4-6: partly correct: vague, incomplete, or right and wrong statements mixed.\n"
    "2-3: mostly wrong, or describes objects or attributes that the reference contradicts.\n"
    "1: wrong, empty, off-topic or unreadable.\n"
    "Judge content, not style or length; extra details count against the answer only when the reference "
    "contradicts them. Reply with one JSON object and nothing else: "
    '{"score": <integer 1-10>, "reason": "<one sentence>"}'
)
RATINGS = range(1, 11)


def load(cfg: EvalConfig) -> TaskData:
    path = require_file(cfg.data, "judge", "JSON lines: image, question, reference; or a cc_sbu_align folder")
    if path.is_dir():
        return _load_aligned(path)
    root = images_root(cfg, path)
    items, seen = [], set()
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        item_id = text_field(row, ("question_id", "id"), where, required=False) or str(number)
        check_unique(item_id, seen, where)
        reference = text_field(row, ("reference", "answer"), where, required=False)
        if reference is None and isinstance(row.get("answers"), list) and row["answers"]:
            first = row["answers"][0]
            reference = first.get("answer") if isinstance(first, dict) else first
        if not isinstance(reference, str):
            raise UsageError(f"{where}: missing 'reference' (the answer the judge compares against)")
        question = text_field(row, ("question", "text"), where)
        items.append(
            image_item(
                item_id, root, text_field(row, ("image",), where), reference=reference, question=question
            )
        )
    return TaskData(iter(items), len(items), fingerprint(path, [path], [i.image for i in items], len(items)))


def _load_aligned(root: Path) -> TaskData:
    from mgpt4.data import aligned

    try:
        annotations = aligned.read_annotations(root)
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    items, seen = [], set()
    for entry in annotations:
        check_unique(entry["image_id"], seen, str(root / aligned.ANNOTATIONS_FILE))
        items.append(
            image_item(
                entry["image_id"],
                root / aligned.IMAGE_DIR,
                f"{entry['image_id']}.jpg",
                reference=entry["caption"],
            )
        )
    files = [root / aligned.ANNOTATIONS_FILE]
    return TaskData(iter(items), len(items), fingerprint(root, files, [i.image for i in items], len(items)))


# --------------------------------------------------------------------------------------------------
# the judge
# --------------------------------------------------------------------------------------------------


class JudgeClient(OpenAIFixer):
    """Curate's OpenAI-compatible client (retries, backoff, timeouts) sending the rubric instead."""

    name = "judge"

    def request_body(self, text: str) -> dict:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": JUDGE_RUBRIC}, {"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": self.cfg.max_new_tokens,
        }


def make_client(cfg: EvalConfig) -> JudgeClient:
    """The judge client for ``cfg.judge`` (a bad URL fails here, before any answer is generated)."""
    judge = cfg.judge
    try:
        return JudgeClient(
            FixerConfig(
                backend="openai", url=judge.url, model=judge.model, key=judge.key, timeout=judge.timeout,
                retries=judge.retries, backoff=judge.backoff, workers=judge.workers,
                max_new_tokens=judge.max_new_tokens,
            )
        )  # fmt: skip
    except UsageError as exc:
        raise UsageError(str(exc).replace("fixer.url", "judge.url")) from exc


def judge_message(question: str, reference: str, answer: str) -> str:
    """The user message: the question, the reference, the answer to rate."""
    return f"Question: {question}\n\nReference answer: {reference}\n\nAssistant's answer: {answer}"


def parse_rating(reply: str) -> tuple[int | None, str]:
    """(rating 1–10 or None, reason) from the judge's reply: the JSON asked for, else "score: N"."""
    match = re.search(r"\{.*\}", reply, re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            rating = _as_rating(data.get("score", data.get("rating")))
            if rating is not None:
                return rating, str(data.get("reason", "")).strip()
    match = re.search(r"\b(?:score|rating)\b\W{0,5}(10|[1-9])\b", reply, re.IGNORECASE) or re.fullmatch(
        r"\s*(10|[1-9])\s*(?:/\s*10)?\s*\.?\s*", reply
    )
    return (int(match.group(1)), reply.strip()) if match else (None, reply.strip())


def _as_rating(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value in RATINGS else None


def annotator(cfg: EvalConfig) -> Callable[[list[dict[str, Any]]], None]:
    """Rates a batch of records in place: ``record["judge"] = {rating, reason, ok, error, model}``."""
    client = make_client(cfg)

    def annotate(records: list[dict[str, Any]]) -> None:
        answered = [r for r in records if not r.get("error")]
        messages = [judge_message(r["question"], r["reference"], r["answer"]) for r in answered]
        for record, result in zip(answered, fix_many(client, messages, cfg.judge.workers), strict=True):
            rating, reason = parse_rating(result.text) if result.ok else (None, "")
            error = result.error if not result.ok else (None if rating else "the reply holds no score 1-10")
            record["judge"] = {
                "rating": rating,
                "reason": reason,
                "ok": rating is not None,
                "error": error,
                "model": cfg.judge.model,
                "reply": result.text if result.ok and rating is None else None,
            }

    return annotate


def incomplete(record: dict[str, Any]) -> bool:
    """An answered record whose rating failed: rate it again on the next run."""
    return not record.get("error") and not record.get("judge", {}).get("ok", False)


def score(records: list[dict[str, Any]], cfg: EvalConfig) -> TaskScores:
    ratings = {r["id"]: r.get("judge", {}).get("rating") for r in records}
    rated = [v for v in ratings.values() if v is not None]
    histogram = Counter(rated)
    metrics: dict[str, Any] = {
        "mean_rating": sum(rated) / len(rated) if rated else None,
        "histogram": {str(k): histogram.get(k, 0) for k in RATINGS},
        "rated": len(rated),
        "unrated": len(records) - len(rated),
        "n": len(records),
    }
    notes = [f"{metrics['unrated']} answers have no rating yet (the judge failed); run again to retry"]
    per_item = {item_id: {"rating": rating} for item_id, rating in ratings.items()}
    return TaskScores(per_item, metrics, notes if metrics["unrated"] else [])


def settings(cfg: EvalConfig) -> dict[str, Any]:
    """What scores.json records about the judge (never the key)."""
    judge = dataclasses.replace(cfg.judge, key=None)
    return {"judge": {"model": judge.model, "url": judge.url, "rubric": JUDGE_RUBRIC}}


TASK = Task(
    name="judge", load=load, score=score, default_prompt="{question}", primary="rating",
    annotator=annotator, incomplete=incomplete, settings=settings,
)  # fmt: skip
