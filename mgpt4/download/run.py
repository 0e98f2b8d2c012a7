"""``mgpt4 download``: URL lists → img2dataset-compatible WebDataset shards, resumable.

    cfg = load_config(DownloadConfig, None, ["inputs=[urls.parquet]", "output=shards", "preset=laion"])
    summary = run_download(cfg)

Input rows are cut into shards of ``shard_size`` in input order, so shard N always holds the same rows
and a rerun of the same command finds its earlier work: complete shards (``NNNNN_stats.json`` present)
are skipped, incomplete ones resume from their partial files (``mgpt4.download.shard_writer``).

Parallelism: ``processes`` worker processes (``mgpt4.download.pool``) or Ray tasks on a cluster
(``mgpt4.download.ray_distributor``), each downloading one shard at a time with ``threads`` threads that
carry a row all the way from request to JPEG (``mgpt4.download.shard_download``). Without Ray, several
machines share one list with ``node_rank``/``num_nodes``: each takes every ``num_nodes``-th shard, and
``merge_report`` sums up the folder afterwards.

The output is a local folder or any fsspec URL (``mgpt4.download.storage``); inputs too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgpt4.config import load_config, save_config
from mgpt4.data import sources
from mgpt4.download.config import IDENTITY_KEYS, DownloadConfig
from mgpt4.download.fetch import TRANSIENT_KINDS
from mgpt4.download.pool import ShardPool, Skipped, execute, sigterm_as_interrupt
from mgpt4.download.progress import DownloadProgress, ProgressCallback
from mgpt4.download.report import SHARD_FILE, DownloadSummary, read_stats
from mgpt4.download.shard_download import ShardJob, ShardResult
from mgpt4.download.shard_writer import shard_name
from mgpt4.download.storage import LocalFolder, RemoteFolder, open_output
from mgpt4.download.worker import WorkerSpec
from mgpt4.errors import ConfigError, DataError, UsageError

log = logging.getLogger("mgpt4.download")

CONFIG_FILE = "download_config.yaml"
Folder = LocalFolder | RemoteFolder


def run_download(cfg: DownloadConfig, progress: ProgressCallback | None = None) -> DownloadSummary:
    """Download every row of ``cfg.inputs`` into shards under ``cfg.output``; returns a ``DownloadSummary``.

    ``progress`` gets a ``DownloadStatus`` after each update; without it a line is logged every 10 s.

    Raises:
        ConfigError: an invalid setting (``DownloadConfig.validate``).
        UsageError: missing/unknown inputs, no URL column, a folder written with other settings or in use,
            Ray asked for but not installed.
        DataError: unreadable inputs, unwritable output, a worker process that died.
    """
    cfg.validate()
    if cfg.distributor == "ray":
        from mgpt4.download.ray_distributor import require_ray

        require_ray()
    inputs = sources.check_inputs(cfg.inputs)
    cfg = dataclasses.replace(cfg, inputs=[str(p.resolve()) if isinstance(p, Path) else p for p in inputs])
    columns = sources.resolve_columns(cfg.url_col, cfg.caption_col, cfg.preset)
    sources.check_columns(inputs, columns)
    folder = open_output(cfg.output)
    with _distributor(cfg) as cluster:  # joined before the output is touched: a bad address writes nothing
        folder.create()
        with folder.lock(_lock_name(cfg)):
            return _download(cfg, inputs, columns, folder, cluster, progress)


def _distributor(cfg: DownloadConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.distributor != "ray":
        return contextlib.nullcontext()
    from mgpt4.download.ray_distributor import RayCluster

    return RayCluster(cfg.ray_address, cfg.processes)


def _download(
    cfg: DownloadConfig,
    inputs: list[Path | str],
    columns: sources.Columns,
    folder: Folder,
    cluster: Any,
    progress: ProgressCallback | None,
) -> DownloadSummary:
    """The run itself, with the distributor joined and the folder held."""
    _check_same_settings(folder, cfg)
    _save_config(folder, cfg)
    counts = [sources.count_rows(p) for p in inputs]
    known = cfg.num_nodes == 1 and all(c is not None for c in counts)
    total = sum(c for c in counts if c is not None) if known else None
    started = time.monotonic()
    # Workers get an absolute path: a Ray worker does not run in the driver's current directory.
    where = str(folder.path.resolve()) if isinstance(folder, LocalFolder) else folder.location
    spec = WorkerSpec(
        where, cfg.fetch, cfg.image, cfg.threads, cfg.decode_memory_mb << 20, cfg.checkpoint_seconds
    )
    complete = {shard_id: stats.get("count") for shard_id, stats in read_stats(folder).items()}
    if cluster is not None:
        with DownloadProgress(total, progress) as tally, sigterm_as_interrupt():
            results, shards = cluster.execute(
                _plan(inputs, columns, cfg, folder, complete, tally), spec, tally
            )
    else:
        pool = ShardPool(spec, cfg.processes or os.cpu_count() or 1)  # forked before any thread starts
        with DownloadProgress(total, progress) as tally, sigterm_as_interrupt():
            results, shards = execute(_plan(inputs, columns, cfg, folder, complete, tally), pool, tally)
    return _summary(cfg, folder, results, shards, time.monotonic() - started)


def _lock_name(cfg: DownloadConfig) -> str:
    """One run holds the folder; with ``num_nodes`` > 1 each node holds its own share of it."""
    if cfg.num_nodes == 1:
        return ".download.lock"
    return f".download.node-{cfg.node_rank}-of-{cfg.num_nodes}.lock"


def _check_same_settings(folder: Folder, cfg: DownloadConfig) -> None:
    """The saved settings guard the shards written with them; with no shard yet (a run that failed on
    its inputs or columns, or was stopped at once) there is nothing to guard and they are replaced."""
    names = folder.names()
    if CONFIG_FILE not in names or not any(SHARD_FILE.match(n) for n in names):
        return
    saved_path = folder.child(CONFIG_FILE)
    try:
        with folder.local_copy(CONFIG_FILE) as local:
            saved = load_config(DownloadConfig, local)
    except (ConfigError, OSError) as exc:
        raise UsageError(
            f"{saved_path}: unreadable ({exc}); delete it or choose another output folder"
        ) from exc
    for key in IDENTITY_KEYS:
        old, new = getattr(saved, key), getattr(cfg, key)
        if old != new:
            shown_old = dataclasses.asdict(old) if dataclasses.is_dataclass(old) else old
            shown_new = dataclasses.asdict(new) if dataclasses.is_dataclass(new) else new
            raise UsageError(
                f"{folder.location} was written with {key}={shown_old}, this run has {key}={shown_new}; "
                "rerun with the same inputs and settings to resume, or choose another output folder"
            )


def _save_config(folder: Folder, cfg: DownloadConfig) -> None:
    header = f"mgpt4 download --config {folder.child(CONFIG_FILE)}"
    if folder.is_remote:  # --config reads a local file
        header = f"mgpt4 download --config {CONFIG_FILE}  (a local copy of {folder.child(CONFIG_FILE)})"
    try:
        if isinstance(folder, LocalFolder) and cfg.num_nodes == 1:
            save_config(cfg, folder.path / CONFIG_FILE, header=header)
            return
        if isinstance(folder, LocalFolder):  # nodes starting together: each writes its own file, then renames
            mine = folder.path / f".{CONFIG_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
            save_config(cfg, mine, header=header).replace(folder.path / CONFIG_FILE)
            return
        with tempfile.TemporaryDirectory(prefix="mgpt4-") as tmp:
            folder.write_from(save_config(cfg, Path(tmp) / CONFIG_FILE, header=header), CONFIG_FILE)
    except OSError as exc:
        raise DataError(f"{folder.child(CONFIG_FILE)}: cannot write ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------------------------------
# planning: which shards need work
# --------------------------------------------------------------------------------------------------


def _plan(
    inputs: list[Path | str],
    columns: sources.Columns,
    cfg: DownloadConfig,
    folder: Folder,
    complete: dict[int, Any],
    progress: DownloadProgress,
) -> Iterator[ShardJob | Skipped]:
    rows_iter = sources.iter_rows(inputs, columns)
    total = 0
    for shard_id in itertools.count():
        rows = list(itertools.islice(rows_iter, cfg.shard_size))
        if not rows:
            break
        if shard_id % cfg.num_nodes != cfg.node_rank:
            continue  # another node's shard
        total += len(rows)
        if complete.get(shard_id) != len(rows):  # new, unfinished, or the list grew
            yield ShardJob(shard_id, rows, cfg.shard_size)
        elif cfg.retry_failed and _has_transient_failures(folder, shard_id):
            yield ShardJob(shard_id, rows, cfg.shard_size, retry_transient=True)
        else:
            yield Skipped(shard_id, len(rows))
    progress.set_total(total)


def _has_transient_failures(folder: Folder, shard_id: int) -> bool:
    try:
        records = folder.read_parquet(f"{shard_name(shard_id)}.parquet", columns=["status", "error_kind"])
    except (OSError, ValueError):
        return False
    return any(r.get("status") != "success" and r.get("error_kind") in TRANSIENT_KINDS for r in records)


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def _summary(
    cfg: DownloadConfig, folder: Folder, results: list[ShardResult], shards: Counter, seconds: float
) -> DownloadSummary:
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
    for stats in read_stats(folder).values():
        dataset["shards"] += 1
        dataset["rows"] += int(stats.get("count", 0))
        dataset["successes"] += int(stats.get("successes", 0))
    return DownloadSummary(
        output=folder.location,
        run={
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
        shards={key: shards[key] for key in ("written", "skipped", "incomplete")},
        dataset=dataset,
    )
