"""``mgpt4 curate``: describe → Continue → fix → filter → aligned set, resumable (MiniGPT-4 §3.3).

    cfg = load_config(CurateConfig, None, ["model_source=runs/stage1", "images=shards/", "out=aligned/"])
    summary = run_curate(cfg)          # kill it and run again: finished images are not redone
    run_review(ReviewConfig(out="aligned/", ids=["42", "77"]))   # drop what a person rejected

Outputs in ``out``: ``image/{id}.jpg`` + ``filter_cap.json`` (the released cc_sbu_align format),
``rejected/{id}.jpg``, ``curate.jsonl`` (the journal, see ``records``), ``report.html`` and
``curate.yaml`` (the resolved config, without the API key).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mgpt4.config import save_config
from mgpt4.curate import records
from mgpt4.curate.config import CurateConfig, ReviewConfig
from mgpt4.curate.filters import FILTER_NAMES, FilterConfig, Verdict, normalize, run_filters
from mgpt4.curate.fix import Fixer, FixResult, fix_many, make_fixer
from mgpt4.curate.generate import Description, describe_batch
from mgpt4.curate.images import CurateImage, count_images, iter_images
from mgpt4.curate.report import write_report
from mgpt4.data.aligned import write_aligned
from mgpt4.errors import DataError, UsageError
from mgpt4.output_paths import check_writable

log = logging.getLogger("mgpt4.curate")

# Rejection reasons besides the content filters: the fixer failed (the text is kept and the fix is
# retried on the next run), the image could not be decoded, a person rejected it in review.
EXTRA_VERDICTS = ("fix_error", "unreadable", "review")

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass
class CurateSummary:
    """The curated set as it now stands, and what this run did (``to_json`` is the --json summary)."""

    out: str
    fixer: str
    images: int
    accepted: int
    rejected: int
    continued: int
    fix_errors: int
    rejected_by: dict[str, int]  # per filter (a row may fail several)
    filter_cap: str
    report: str
    # `mgpt4 curate`
    described_now: int | None = None
    resumed: int | None = None
    refixed: int | None = None
    seconds: float | None = None
    # `mgpt4 curate review` (and curate with --reject)
    reviewed: int | None = None
    removed: int | None = None
    unknown_ids: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def run_curate(cfg: CurateConfig, progress: Progress | None = None) -> CurateSummary:
    """Curate ``cfg.num`` images into ``cfg.out``; images already in the journal are skipped.

    Args:
        cfg: the resolved config (``model_source``, ``images`` and ``out`` are required).
        progress: called with (done, total) after each batch.

    Returns:
        The summary: counts, rejections per filter, paths, seconds.

    Raises:
        UsageError: missing/invalid options; DataError/CheckpointError: unreadable inputs.
    """
    for key, flag in (("model_source", "--model"), ("images", "--images"), ("out", "--out")):
        if not getattr(cfg, key):
            raise UsageError(f"{flag} is required (config key {key})")
    cfg.validate()
    start = time.perf_counter()
    sources = iter_images(cfg.images, cfg.num)  # fails on a bad --images before anything is written
    out = check_writable(cfg.out, "--out", folder=True)
    save_config(
        dataclasses.replace(cfg, fixer=dataclasses.replace(cfg.fixer, key=None)),
        out / "curate.yaml",
        header="mgpt4 curate — resolved config (the API key is never saved)",
    )
    journal = records.read_journal(out)
    done = records.latest_records(journal)
    pending_fix = [r for r in done.values() if _fix_failed(r)]
    fixer: Fixer | None = None
    if pending_fix:
        fixer = make_fixer(cfg.fixer, _fixer_device(cfg))
        _refix(out, journal, pending_fix, fixer, cfg)
    total = count_images(cfg.images, cfg.num)
    counts = _describe_all(out, sources, done, fixer, cfg, progress, total)
    if cfg.reject:
        summary = review(out, records.read_ids(cfg.reject), fixer_name=cfg.fixer.backend)
    else:
        summary = finalize(out, fixer_name=cfg.fixer.backend)
    summary.described_now, summary.resumed = counts["described_now"], counts["resumed"]
    summary.refixed, summary.seconds = len(pending_fix), round(time.perf_counter() - start, 3)
    return summary


def _fixer_device(cfg: CurateConfig) -> str:
    from mgpt4.infer.loading import resolve_device

    return str(resolve_device(cfg.device))


def _describe_all(
    out: Path,
    sources: Iterator[CurateImage],
    done: dict[str, dict],
    fixer: Fixer | None,
    cfg: CurateConfig,
    progress: Progress | None,
    total: int | None,
) -> dict[str, int]:
    """Describe, fix and judge every source not in the journal yet, one journal append per batch."""
    seen = {normalize(r["caption"]) for r in done.values() if r.get("accepted")}
    counts = {"described_now": 0, "resumed": 0}
    model = transform = None
    batch: list[CurateImage] = []
    for source in itertools.chain(sources, [None]):
        if source is not None and source.image_id in done:
            counts["resumed"] += 1
            continue
        if source is not None and any(b.image_id == source.image_id for b in batch):
            log.warning("%s: image id %s seen twice, the second one is skipped", source.name, source.image_id)
            continue
        if source is not None:
            batch.append(source)
            if len(batch) < cfg.batch_size:
                continue
        if not batch:
            break
        if model is None:
            model, transform = _load_model(cfg)
            fixer = fixer or make_fixer(cfg.fixer, _fixer_device(cfg))
            log.info("%d images already in the journal; describing the rest", counts["resumed"])
        rows = _process_batch(out, batch, model, transform, fixer, seen, cfg)
        records.append_records(out, rows)
        done.update((r["image_id"], r) for r in rows)
        counts["described_now"] += len(batch)
        finished = counts["described_now"] + counts["resumed"]
        # On a TTY the progress bar shows this; log lines are for pipes and files.
        log.log(
            logging.DEBUG if progress else logging.INFO,
            "%d/%s images (%d of this batch accepted)",
            finished,
            total or "?",
            sum(r["accepted"] for r in rows),
        )
        if progress:
            progress(finished, total)
        batch = []
    return counts


def _load_model(cfg: CurateConfig):
    from mgpt4.infer.loading import load_model, split_model_source
    from mgpt4.model.vision import image_transform

    checkpoint, preset = split_model_source(cfg.model_source)
    model_cfg = dataclasses.replace(cfg.model, preset=preset) if preset else cfg.model
    model = load_model(model_cfg, checkpoint, cfg.device)
    return model, image_transform(model.preset.vision.image_size)


def _process_batch(
    out: Path, batch: list[CurateImage], model, transform, fixer: Fixer, seen: set[str], cfg: CurateConfig
) -> list[dict[str, Any]]:
    images, readable, rows = [], [], []
    for source in batch:
        try:
            images.append(transform(source.load()))
            readable.append(source)
        except DataError as exc:
            log.warning("skipping %s", exc)
            rows.append(_unreadable_record(source, str(exc)))
    if not readable:
        return rows
    with torch.inference_mode():
        descriptions = describe_batch(
            model, torch.stack(images), cfg.generate, cfg.continue_min_tokens, cfg.prompt
        )
    fixes = fix_many(fixer, [d.text for d in descriptions], cfg.fixer.workers if fixer.uses_llm else 1)
    for source, description, fixed in zip(readable, descriptions, fixes, strict=True):
        record = _record(source, description, fixed, fixer, seen, cfg.filters)
        if record["accepted"]:
            seen.add(normalize(record["caption"]))
        records.store_image(out, source.image_id, record["accepted"], source.jpeg_bytes())
        rows.append(record)
    return rows


def _record(
    source: CurateImage,
    description: Description,
    fixed: FixResult,
    fixer: Fixer,
    seen: set[str],
    cfg: FilterConfig,
) -> dict[str, Any]:
    return judge(
        {
            "image_id": source.image_id,
            "source": source.name,
            "first": description.first,
            "continuation": description.continuation,
            "answer": description.text,
            "continued": description.continued,
            "tokens": {"first": description.first_tokens, "continue": description.continuation_tokens},
            "fixed": fixed.text,
            "fix": {
                "backend": fixer.name,
                "ok": fixed.ok,
                "error": fixed.error,
                "seconds": round(fixed.seconds, 4),
                "llm": fixer.uses_llm,
            },
            "seconds": {
                "generate": round(description.seconds_first, 4),
                "continue": round(description.seconds_continue, 4),
                "fix": round(fixed.seconds, 4),
            },
        },
        seen,
        cfg,
    )


def judge(record: dict[str, Any], seen: set[str], cfg: FilterConfig) -> dict[str, Any]:
    """Set ``caption``, ``verdicts`` and ``accepted`` of a record from its ``answer`` and ``fix``."""
    fix = record["fix"]
    caption = record["fixed"] if fix["ok"] else record["answer"]
    verdicts = [Verdict("fix_error", bool(fix["ok"]), fix.get("error") or "")]
    verdicts += run_filters(
        caption, record["answer"], seen, cfg, fixer_ran=bool(fix.get("llm")) and fix["ok"]
    )
    reviewed = [v for v in record.get("verdicts", []) if v["name"] == "review"]  # a person's call stays
    record["caption"] = caption
    record["verdicts"] = [dataclasses.asdict(v) for v in verdicts] + reviewed
    record["accepted"] = all(v["passed"] for v in record["verdicts"])
    return record


def _unreadable_record(source: CurateImage, error: str) -> dict[str, Any]:
    return {
        "image_id": source.image_id,
        "source": source.name,
        "answer": "",
        "caption": "",
        "continued": False,
        "tokens": {"first": 0, "continue": 0},
        "fix": {"ok": True},
        "verdicts": [dataclasses.asdict(Verdict("unreadable", False, error))],
        "accepted": False,
    }


def _fix_failed(record: dict[str, Any]) -> bool:
    return not record.get("fix", {}).get("ok", True)


def _refix(out: Path, journal: list[dict], pending: list[dict], fixer: Fixer, cfg: CurateConfig) -> None:
    """Retry the fix of records whose fixer call failed last time; the generated text is reused."""
    results = fix_many(fixer, [r["answer"] for r in pending], cfg.fixer.workers if fixer.uses_llm else 1)
    seen = {normalize(r["caption"]) for r in records.latest_records(journal).values() if r.get("accepted")}
    for record, fixed in zip(pending, results, strict=True):
        record["fixed"] = fixed.text
        record["fix"] = {
            "backend": fixer.name,
            "ok": fixed.ok,
            "error": fixed.error,
            "seconds": round(fixed.seconds, 4),
            "llm": fixer.uses_llm,
        }
        judge(record, seen, cfg.filters)
        if record["accepted"]:
            seen.add(normalize(record["caption"]))
    records.rewrite_journal(out, journal)
    log.info("re-fixed %d records (%d ok)", len(pending), sum(not _fix_failed(r) for r in pending))


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


def finalize(out: str | Path, fixer_name: str = "") -> CurateSummary:
    """Rebuild ``filter_cap.json``, the image folders and ``report.html`` from the journal.

    Returns:
        The summary of the set as it now stands.
    """
    out = Path(out)
    rows = list(records.latest_records(records.read_journal(out)).values())
    accepted = []
    for row in rows:
        present = records.place_image(out, row["image_id"], row["accepted"])
        if row["accepted"] and not present:
            log.warning(
                "%s: image missing from %s/, left out of the set", row["image_id"], records.ACCEPTED_DIR
            )
            continue
        if row["accepted"]:
            accepted.append(row)
    # Images are already in image/; write_aligned then only validates ids and writes filter_cap.json.
    write_aligned(
        out, [(r["image_id"], records.image_path(out, r["image_id"], True), r["caption"]) for r in accepted]
    )
    summary = summarize(rows, out, fixer_name)
    write_report(out / "report.html", rows, summary.to_json())
    return summary


def summarize(rows: Sequence[dict[str, Any]], out: Path, fixer_name: str = "") -> CurateSummary:
    """Counts: images, accepted, rejected, continued, and rejections per filter (a row may fail several)."""
    failed: Counter[str] = Counter()
    for row in rows:
        failed.update(v["name"] for v in row.get("verdicts", []) if not v["passed"])
    names = [*FILTER_NAMES, *EXTRA_VERDICTS]
    accepted = sum(bool(r.get("accepted")) for r in rows)
    return CurateSummary(
        out=str(out),
        fixer=fixer_name,
        images=len(rows),
        accepted=accepted,
        rejected=len(rows) - accepted,
        continued=sum(bool(r.get("continued")) for r in rows),
        fix_errors=failed.get("fix_error", 0),
        rejected_by={name: failed.get(name, 0) for name in names},
        filter_cap=str(out / "filter_cap.json"),
        report=str(out / "report.html"),
    )


def run_review(cfg: ReviewConfig, progress: Progress | None = None) -> CurateSummary:
    """``mgpt4 curate review``: drop the ids of ``cfg.reject`` and ``cfg.ids`` from the curated set.

    ``progress`` is accepted for the uniform ``run_<command>`` shape; a review is one quick rewrite.

    Raises:
        UsageError: no folder or no ids given, no journal in ``out``, or none of the ids belongs to it;
        DataError: the id file cannot be read.
    """
    del progress
    if not cfg.out:
        raise UsageError("curate review: --out is required (the curated folder)")
    wanted = (records.read_ids(cfg.reject) if cfg.reject else []) + list(cfg.ids)
    if not wanted:
        raise UsageError("curate review: give --reject FILE and/or ids to drop")
    return review(cfg.out, wanted)


def review(out: str | Path, reject_ids: Sequence[str], fixer_name: str = "") -> CurateSummary:
    """Mark the ids a person rejected, then rewrite ``filter_cap.json``, ``image/`` and the report.

    Raises:
        UsageError: no journal in ``out``, or none of the ids belongs to it.
    """
    out = Path(out)
    journal = records.read_journal(out)
    if not journal:
        raise UsageError(f"{out / records.JOURNAL}: missing or empty — run `mgpt4 curate` into {out} first")
    check_writable(out, "--out", folder=True)
    latest = records.latest_records(journal)
    wanted = list(dict.fromkeys(reject_ids))
    unknown = [i for i in wanted if i not in latest]
    if unknown and len(unknown) == len(wanted):
        raise UsageError(
            f"none of the {len(wanted)} rejected id(s) is in {out / records.JOURNAL} (e.g. '{unknown[0]}')"
        )
    if unknown:
        log.warning("%d id(s) not in the set, ignored: %s", len(unknown), ", ".join(unknown[:5]))
    newly = 0
    for image_id in wanted:
        record = latest.get(image_id)
        if record is None or any(v["name"] == "review" for v in record["verdicts"]):
            continue
        record["verdicts"].append(dataclasses.asdict(Verdict("review", False, "rejected in manual review")))
        newly += record["accepted"]
        record["accepted"] = False
    records.rewrite_journal(out, journal)
    summary = finalize(out, fixer_name or _journal_fixer(journal))
    summary.reviewed, summary.removed, summary.unknown_ids = len(wanted) - len(unknown), newly, unknown
    return summary


def _journal_fixer(journal: Sequence[dict[str, Any]]) -> str:
    return next(
        (r["fix"].get("backend", "") for r in reversed(journal) if r.get("fix", {}).get("backend")), ""
    )
