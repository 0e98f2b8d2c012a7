"""``mgpt4 download``: URL lists → img2dataset-compatible WebDataset shards, resumable.

    cfg = load_config(DownloadConfig, None, ["inputs=[urls.parquet]", "output=shards", "preset=laion"])
    summary = run_download(cfg)

Input rows are cut into shards of ``shard_size`` in input order, so shard N always holds the same rows
and a rerun of the same command finds its earlier work: complete shards (``NNNNN_stats.json`` present)
are skipped, incomplete ones resume from their partial files (``mgpt4.download.shard_writer``).

Parallelism: ``processes`` worker processes, each downloading one shard at a time with ``threads``
threads that carry a row all the way from request to JPEG (``mgpt4.download.shard_download``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgpt4.config import load_config, save_config
from mgpt4.data import sources
from mgpt4.download import shard_writer
from mgpt4.download.config import IDENTITY_KEYS, DownloadConfig
from mgpt4.download.fetch import TRANSIENT_KINDS
from mgpt4.download.pool import ShardPool, Skipped, WorkerSpec, execute, sigterm_as_interrupt
from mgpt4.download.progress import DownloadProgress, ProgressCallback
from mgpt4.download.shard_download import ShardJob, ShardResult
from mgpt4.errors import ConfigError, DataError, UsageError

log = logging.getLogger("mgpt4.download")

CONFIG_FILE = "download_config.yaml"
_LOCK_FILE = ".download.lock"


def run_download(cfg: DownloadConfig, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Download every row of ``cfg.inputs`` into shards under ``cfg.output``; returns a summary dict.

    ``progress`` gets a ``DownloadStatus`` after each update; without it a line is logged every 10 s.

    Raises:
        UsageError: missing/unknown inputs, no URL column, a folder written with other settings or in use.
        DataError: unreadable inputs, unwritable output, a worker process that died.
    """
    paths = sources.check_inputs(cfg.inputs)
    cfg = dataclasses.replace(cfg, inputs=[str(p.resolve()) for p in paths])
    columns = sources.resolve_columns(cfg.url_col, cfg.caption_col, cfg.preset)
    sources.check_columns(paths, columns)
    folder = _output_folder(Path(cfg.output))
    with _folder_lock(folder):
        _check_same_settings(folder, cfg)
        try:
            save_config(cfg, folder / CONFIG_FILE, header=f"mgpt4 download --config {folder / CONFIG_FILE}")
        except OSError as exc:
            raise DataError(f"{folder / CONFIG_FILE}: cannot write ({exc.strerror or exc})") from exc
        counts = [sources.count_rows(p) for p in paths]
        total = sum(counts) if all(c is not None for c in counts) else None
        started = time.monotonic()
        spec = WorkerSpec(folder, cfg.fetch, cfg.image, cfg.threads, cfg.decode_memory_mb << 20)
        pool = ShardPool(spec, cfg.processes or os.cpu_count() or 1)
        with DownloadProgress(total, progress) as counts, sigterm_as_interrupt():
            results, shards = execute(_plan(paths, columns, cfg, folder, counts), pool, counts)
        return _summary(cfg, folder, results, shards, time.monotonic() - started)


def _output_folder(folder: Path) -> Path:
    """Create the output folder; a path that cannot be one is the user's to change (UsageError)."""
    hint = "choose another output folder with -o"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: is a file, not a folder; {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{folder}: cannot create the output folder ({exc.strerror or exc}); {hint}"
        ) from exc
    return folder


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        handle = open(folder / _LOCK_FILE, "w")  # noqa: SIM115 - `with handle` below closes it
    except OSError as exc:
        raise UsageError(
            f"{folder}: cannot write to the output folder ({exc.strerror or exc}); "
            "choose another output folder with -o"
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise UsageError(f"{folder}: another `mgpt4 download` is writing to this folder") from exc
        yield


def _check_same_settings(folder: Path, cfg: DownloadConfig) -> None:
    """The saved settings guard the shards written with them; with no shard yet (a run that failed on
    its inputs or columns, or was stopped at once) there is nothing to guard and they are replaced."""
    saved_path = folder / CONFIG_FILE
    if not saved_path.is_file() or not shard_writer.has_shard_files(folder):
        return
    try:
        saved = load_config(DownloadConfig, saved_path)
    except ConfigError as exc:
        raise UsageError(
            f"{saved_path}: unreadable ({exc}); delete it or choose another output folder"
        ) from exc
    for key in IDENTITY_KEYS:
        old, new = getattr(saved, key), getattr(cfg, key)
        if old != new:
            shown_old = dataclasses.asdict(old) if dataclasses.is_dataclass(old) else old
            shown_new = dataclasses.asdict(new) if dataclasses.is_dataclass(new) else new
            raise UsageError(
                f"{folder} was written with {key}={shown_old}, this run has {key}={shown_new}; "
                "rerun with the same inputs and settings to resume, or choose another output folder"
            )


# --------------------------------------------------------------------------------------------------
# planning: which shards need work
# --------------------------------------------------------------------------------------------------


def _plan(
    paths: list[Path], columns: sources.Columns, cfg: DownloadConfig, folder: Path, progress: DownloadProgress
) -> Iterator[ShardJob | Skipped]:
    rows_iter = sources.iter_rows(paths, columns)
    total = 0
    for shard_id in itertools.count():
        rows = list(itertools.islice(rows_iter, cfg.shard_size))
        if not rows:
            break
        total += len(rows)
        if shard_writer.completed_rows(folder, shard_id) != len(rows):  # new, unfinished, or the list grew
            yield ShardJob(shard_id, rows, cfg.shard_size)
        elif cfg.retry_failed and _has_transient_failures(folder, shard_id):
            yield ShardJob(shard_id, rows, cfg.shard_size, retry_transient=True)
        else:
            yield Skipped(shard_id, len(rows))
    progress.set_total(total)


def _has_transient_failures(folder: Path, shard_id: int) -> bool:
    try:
        records = shard_writer.read_records(folder, shard_id)
    except (OSError, ValueError):
        return False
    return any(r.get("status") != "success" and r.get("error_kind") in TRANSIENT_KINDS for r in records)


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def _summary(
    cfg: DownloadConfig, folder: Path, results: list[ShardResult], shards: Counter, seconds: float
) -> dict[str, Any]:
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    examples: dict[str, str] = {}
    for r in results:
        statuses.update(r.statuses)
        kinds.update(r.error_kinds)
        for kind, message in r.examples.items():
            examples.setdefault(kind, message)
    rows = sum(statuses.values())
    dataset = {"shards": 0, "rows": 0, "successes": 0}
    for stats_file in sorted(folder.glob("*_stats.json")):
        stats = _read_json(stats_file)
        if stats:
            dataset["shards"] += 1
            dataset["rows"] += int(stats.get("count", 0))
            dataset["successes"] += int(stats.get("successes", 0))
    return {
        "output": str(folder),
        "run": {
            "rows": rows,
            "successes": statuses["success"],
            "failed_to_download": statuses["failed_to_download"],
            "failed_to_resize": statuses["failed_to_resize"],
            "success_rate": statuses["success"] / rows if rows else 0.0,
            "seconds": seconds,
            "images_per_s": statuses["success"] / seconds if seconds > 0 else 0.0,
            "error_kinds": dict(kinds.most_common()),
            "examples": examples,
        },
        "shards": {
            "written": shards["written"],
            "skipped": shards["skipped"],
            "incomplete": shards["incomplete"],
        },
        "dataset": dataset,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
