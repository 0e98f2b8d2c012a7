"""``run_eval``: answer a task's items in batches, journal them, score them, write the results.

Outputs in ``out``:

- ``answers.jsonl``: one record per item — ``id``, ``image``, ``question`` (the instruction asked),
  ``prompt`` (the full prompt), ``answer``, ``tokens``, ``seconds``, ``reference``, ``error``,
  ``scores`` (per item; null for unreadable images), and ``judge`` for the judge task. While answering
  it is a journal: records are appended per batch with fsync, a torn last line (a kill mid-write) is cut
  off on the next run, and items already in it are not answered again. Scoring rewrites it atomically
  in data order with the per-item scores.
- ``scores.json``: task, metrics, notes, model, settings, data fingerprint, mgpt4 version.
- ``report.html``: every answer with its image and scores, worst first.
- ``run.json`` (what the answers depend on: a rerun with another model, prompt, decoding or data is
  refused rather than mixed in) and ``eval.yaml`` (the resolved config, never the judge key).

Every item is asked in a fresh single-turn prompt built from that item alone (``item_prompt``): no
history is ever carried from one question to the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mgpt4 import __version__
from mgpt4.config import save_config
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, IMAGE_SLOT, ChatTurn, chat_prompt
from mgpt4.errors import UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.journal import AnswerJournal, read_answers, rewrite_answers
from mgpt4.eval.report import write_report
from mgpt4.eval.tasks import get_task
from mgpt4.eval.tasks.base import EvalItem, Task, TaskData

log = logging.getLogger("mgpt4.eval")

Progress = Callable[[int, "int | None"], None]
ANSWERS = "answers.jsonl"
SCORES = "scores.json"
REPORT = "report.html"
RUN_IDENTITY = "run.json"
THUMBS = "thumbs"
THUMB_SIZE = 160
# describe's default instruction, without its image slot: "Describe this image in detail."
DEFAULT_INSTRUCTION = ALIGNMENT_INSTRUCTIONS[0].removeprefix(IMAGE_SLOT).strip()


@dataclasses.dataclass
class EvalResult:
    """What ``run_eval`` did: the metrics and where the outputs are (``to_json`` is the --json summary)."""

    task: str
    out: str
    metrics: dict[str, Any]
    items: int
    errors: int
    answered_now: int
    resumed: int
    seconds: float
    answers_per_s: float | None
    notes: list[str]
    answers: str
    scores: str
    report: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_eval(cfg: EvalConfig, progress: Progress | None = None, model=None) -> EvalResult:
    """Evaluate a model on ``cfg.task``; answers already in ``cfg.out`` are kept, not redone.

    Args:
        cfg: the resolved config.
        progress: called with (items done, total or None) after each batch.
        model: an already loaded ``MiniGPT4`` (e.g. at the end of training; set ``cfg.checkpoint`` to
            where it came from, which names the model in scores.json); None loads ``cfg.checkpoint`` /
            ``cfg.model`` when there is anything left to answer.

    Raises:
        UsageError: bad options or malformed data (names the file and line), or an output folder
            holding answers made with other settings.
    """
    start = time.perf_counter()
    cfg.validate()
    task = get_task(cfg.task)
    _check_prompt(cfg, task)
    data = task.load(cfg)  # a malformed data file fails here, before anything is written
    annotate = task.annotator(cfg) if task.annotator else None
    out = Path(cfg.output_dir())
    out.mkdir(parents=True, exist_ok=True)
    _claim_output(out, cfg, data)
    done = {r["id"]: r for r in read_answers(out / ANSWERS)}
    if annotate and task.incomplete:
        _redo_annotations(out, done, annotate, task)
    answering = _answer_all(out, data, done, task, cfg, annotate, progress, model)
    result = _finalize(out, cfg, task, data, done, answering)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _check_prompt(cfg: EvalConfig, task: Task) -> None:
    asks = task.default_prompt is not None and "{question}" in task.default_prompt
    if cfg.prompt is not None and asks and "{question}" not in cfg.prompt:
        raise UsageError(
            f"prompt: the {task.name} task needs {{question}} in the prompt (its items' questions)"
        )


def _claim_output(out: Path, cfg: EvalConfig, data: TaskData) -> None:
    """Save what the answers depend on; refuse a folder whose answers depend on something else."""
    identity = {
        "task": cfg.task,
        "model": _model_identity(cfg),
        "prompt": cfg.prompt,
        "prompt_style": cfg.prompt_style,
        "generate": dataclasses.asdict(cfg.generate),
        # The data files' bytes; the image listing only where there is no data file (shards): an
        # image that was missing and is now there must not block the rerun that answers it.
        "data": data.fingerprint.get("sha256") or data.fingerprint.get("listing_sha256"),
    }
    path = out / RUN_IDENTITY
    if path.is_file() and (out / ANSWERS).is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in identity if saved.get(key) != identity[key]]
        if changed:
            raise UsageError(
                f"{out}: holds answers made with another {', '.join(changed)}; "
                f"use another out=FOLDER or delete {out / ANSWERS}"
            )
    _write_text(path, json.dumps(identity, indent=2) + "\n")
    save_config(
        dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, key=None)),
        out / "eval.yaml",
        header="mgpt4 eval — resolved config (the judge's API key is never saved)",
    )


def _model_identity(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.checkpoint:
        return {"checkpoint": os.path.abspath(cfg.checkpoint)}
    return {"model": dataclasses.asdict(cfg.model)}


def _redo_annotations(out: Path, done: dict[str, dict], annotate: Callable, task: Task) -> None:
    redo = [r for r in done.values() if task.incomplete(r)]
    if redo:
        log.info("%d journaled answers need their judge rating again", len(redo))
        annotate(redo)
        rewrite_answers(out / ANSWERS, done.values())


# --------------------------------------------------------------------------------------------------
# answering
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Answering:
    selected: list[str]  # every id of this run's items (the first `limit`), in data order
    answered_now: int = 0
    resumed: int = 0
    seconds: float = 0.0  # answering time, model loading excluded


def _answer_all(
    out: Path,
    data: TaskData,
    done: dict[str, dict],
    task: Task,
    cfg: EvalConfig,
    annotate: Callable | None,
    progress: Progress | None,
    model,
) -> _Answering:
    """Answer every selected item not in the journal, one journal append per batch."""
    items: Iterable[EvalItem] = itertools.islice(data.items, cfg.limit) if cfg.limit else data.items
    total = min(data.total, cfg.limit or data.total) if data.total is not None else cfg.limit
    state = _Answering(selected=[])
    pending: list[EvalItem] = []
    with AnswerJournal(out / ANSWERS) as answers:
        for item in itertools.chain(items, [None]):
            if not _take(item, state, pending, done, cfg):
                continue
            if not pending:
                break
            if model is None:
                model = _load_model(cfg)
                log.info("%d items already answered in %s; answering the rest", state.resumed, out)
            started = time.perf_counter()
            rows = _answer_batch(model, pending, cfg, task, out)
            if annotate:
                annotate(rows)
            answers.append(rows)
            state.seconds += time.perf_counter() - started
            done.update((r["id"], r) for r in rows)
            state.answered_now += len(rows)
            finished = state.answered_now + state.resumed
            log.log(
                logging.DEBUG if progress else logging.INFO, "%d/%s items answered", finished, total or "?"
            )
            if progress:
                progress(finished, total)
            pending.clear()
    if progress and not state.answered_now:
        progress(state.resumed, total)
    return state


def _take(
    item: EvalItem | None, state: _Answering, pending: list[EvalItem], done: dict, cfg: EvalConfig
) -> bool:
    """Note ``item``; True when a batch is due (full, or the items ran out: ``item`` is None)."""
    if item is None:
        return True
    state.selected.append(item.id)
    if item.id in done and not done[item.id].get("error"):  # unreadable last time: try again
        state.resumed += 1
        return False
    pending.append(item)
    return len(pending) >= cfg.batch_size


def _load_model(cfg: EvalConfig):
    from mgpt4.infer.loading import load_model

    return load_model(cfg.model, cfg.checkpoint, cfg.device)


def _answer_batch(model, items: list[EvalItem], cfg: EvalConfig, task: Task, out: Path) -> list[dict]:
    """One generate call through describe's batched path; one record per item, in order."""
    from mgpt4.infer.describe import ImageRequest, generate_batched

    questions = [item_question(item, cfg, task) for item in items]
    requests = [
        ImageRequest(
            item.image, open=_opener(item, out), error=item.error, prompt=item_prompt(q, cfg, model.preset)
        )
        for item, q in zip(items, questions, strict=True)
    ]
    results = generate_batched(model, requests, len(requests), cfg.generate)
    rows = []
    for item, question, result in zip(items, questions, results, strict=True):
        row = {
            "id": item.id,
            "image": item.image,
            "question": question,
            "prompt": result.prompt,
            "answer": result.text,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 4),
            "reference": item.reference,
            "error": result.error,
        }
        if item.image_file is None and item.open is not None:
            row["thumb"] = _thumb_name(item.id)
        rows.append(row)
    return rows


def item_question(item: EvalItem, cfg: EvalConfig, task: Task) -> str:
    """The instruction asked about ``item``: the prompt template with the item's question filled in."""
    template = cfg.prompt if cfg.prompt is not None else task.default_prompt
    if template is None:
        return DEFAULT_INSTRUCTION
    return template.replace("{question}", item.question or "").strip()


def item_prompt(question: str, cfg: EvalConfig, preset) -> str:
    """The whole prompt for one question: a fresh conversation that holds this question only."""
    from mgpt4.infer.describe import build_prompt

    if cfg.prompt_style == "chat":
        return chat_prompt([ChatTurn(question, image="image")], preset.chat_style)
    return build_prompt(question, preset.stage2_template)


def _thumb_name(item_id: str) -> str:
    return f"{THUMBS}/{hashlib.sha1(item_id.encode()).hexdigest()[:16]}.jpg"


def _opener(item: EvalItem, out: Path) -> Callable | None:
    """The item's image opener; images that are not files (shard members) also leave a thumbnail."""
    if item.open is None or item.image_file is not None:
        return item.open
    thumb = out / _thumb_name(item.id)

    def open_and_keep_thumbnail():
        image = item.open()
        if not thumb.exists():
            try:
                small = image.convert("RGB")
                small.thumbnail((THUMB_SIZE, THUMB_SIZE))
                thumb.parent.mkdir(exist_ok=True)
                partial = thumb.with_name(thumb.name + ".tmp")
                small.save(partial, format="JPEG", quality=85)
                partial.replace(thumb)
            except OSError as exc:  # a thumbnail is for the report only: never fail the answer over it
                log.warning("%s: no thumbnail (%s)", item.image, exc)
        return image

    return open_and_keep_thumbnail


# --------------------------------------------------------------------------------------------------
# scoring and outputs
# --------------------------------------------------------------------------------------------------


def _finalize(
    out: Path, cfg: EvalConfig, task: Task, data: TaskData, done: dict[str, dict], answering: _Answering
) -> EvalResult:
    selected_ids = set(answering.selected)
    selected = [done[i] for i in answering.selected]
    answered = [r for r in selected if not r.get("error")]
    scores = task.score(answered, cfg)
    for record in selected:
        record["scores"] = scores.per_item.get(record["id"]) if not record.get("error") else None
    others = [r for i, r in done.items() if i not in selected_ids]  # answered under a larger limit
    rewrite_answers(out / ANSWERS, selected + others)
    notes = list(scores.notes)
    errors = len(selected) - len(answered)
    if errors:
        notes.append(f"{errors} images could not be read and are left out of the metrics (see 'error')")
    summary = {
        "task": cfg.task,
        "metrics": scores.metrics,
        "items": len(answered),
        "errors": errors,
        "notes": notes,
        "model": _model_identity(cfg),
        "settings": {
            "prompt": cfg.prompt,
            "prompt_style": cfg.prompt_style,
            "default_prompt": task.default_prompt,
            "generate": dataclasses.asdict(cfg.generate),
            "batch_size": cfg.batch_size,
            "limit": cfg.limit,
            "meteor": cfg.meteor if cfg.task == "captions" else None,
        },
        "data": {"spec": cfg.data, "images": cfg.images, **data.fingerprint},
        "mgpt4_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(task.settings(cfg) if task.settings else {}),
    }
    _write_text(out / SCORES, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_report(out / REPORT, selected, summary, task.primary)
    speed = answering.answered_now / answering.seconds if answering.seconds > 0 else None
    return EvalResult(
        task=cfg.task,
        out=str(out),
        metrics=scores.metrics,
        items=len(answered),
        errors=errors,
        answered_now=answering.answered_now,
        resumed=answering.resumed,
        seconds=0.0,
        answers_per_s=round(speed, 3) if speed else None,
        notes=notes,
        answers=str(out / ANSWERS),
        scores=str(out / SCORES),
        report=str(out / REPORT),
    )


def _write_text(path: Path, text: str) -> None:
    """Write a whole file under a temporary name, then rename it into place."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
