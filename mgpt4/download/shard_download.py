"""Download one shard: a pool of threads, each taking the next row through fetch → decode → resize → JPEG.

The whole per-row pipeline runs in the worker threads, not just the fetch: socket reads, hashing and
Pillow's decode/resize/encode all release the GIL, so a process keeps its cores busy with image work
while other threads wait on the network. (img2dataset fetches in threads but resizes every image in
one consumer thread per process.) Finished rows go to the ``ShardWriter`` under a lock.

A row never fails the shard: every exception becomes a status and a reason on that row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mgpt4.data.sources import UrlRow
from mgpt4.download.decode_budget import DecodeBudget
from mgpt4.download.fetch import TRANSIENT_KINDS, Fetcher, FetchError
from mgpt4.download.resize import ImageConfig, ImageError, process_image
from mgpt4.download.shard_writer import ShardWriter
from mgpt4.errors import DataError

log = logging.getLogger("mgpt4.download")


class StopFlag(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


@dataclass
class ShardJob:
    """One shard's input rows, in input order; row ``i`` gets key ``shard_key(shard_id, i, shard_size)``."""

    shard_id: int
    rows: list[UrlRow]
    shard_size: int
    retry_transient: bool = False


@dataclass
class ShardResult:
    """What one run did to one shard (``stats`` covers the whole shard once it is complete)."""

    shard_id: int
    completed: bool
    processed: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] | None = None


def shard_key(shard_id: int, index: int, shard_size: int) -> str:
    """img2dataset's sample key: shard id and row index as one zero-padded number (``000420007``)."""
    digits = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    return f"{shard_id * 10**digits + index:0{5 + digits}d}"


def download_shard(
    job: ShardJob,
    folder: Path,
    fetcher: Fetcher,
    image: ImageConfig,
    threads: int,
    stop: StopFlag,
    report: Callable[[bool], None],
    budget: DecodeBudget | None = None,
    checkpoint: Callable[[int, int], None] | None = None,
    checkpoint_seconds: float = 60.0,
) -> ShardResult:
    """Fetch every row of ``job`` not already in the folder and complete the shard.

    Returns a result with ``completed=False`` (partial files left for the next run) when ``stop`` was set.
    ``budget`` bounds the decoded-image memory of the threads (shared by every shard of the process).
    ``checkpoint(tar_bytes, journal_bytes)`` is called every ``checkpoint_seconds`` with how much of the
    partial tar and journal is written and flushed (whole samples and lines), e.g. to upload them.

    Raises:
        DataError: the shard's files cannot be written (disk full, permissions).
    """
    writer = ShardWriter(folder, job.shard_id)
    keys = [shard_key(job.shard_id, i, job.shard_size) for i in range(len(job.rows))]
    expected = {key: row.url for key, row in zip(keys, job.rows, strict=True)}

    def keep(record: dict[str, Any]) -> bool:
        # An earlier result counts only for the same URL at the same place, and, with --retry-failed,
        # only if it did not fail for a reason worth retrying.
        if expected.get(record["key"], _NO_URL) != record["url"]:
            return False
        return not job.retry_transient or _not_transient(record)

    try:
        done = writer.open(keep)
    except OSError as exc:
        raise DataError(f"{folder}: cannot write shard {job.shard_id:05d} ({exc})") from exc
    todo = deque((i, row) for i, row in enumerate(job.rows) if keys[i] not in done)
    if done:
        log.info(
            "shard %05d: %d rows kept from an earlier run, %d to fetch", job.shard_id, len(done), len(todo)
        )
    result = ShardResult(job.shard_id, completed=False)
    state = _ShardState(job, writer, fetcher, image, budget, todo, stop, report, result)
    workers = [threading.Thread(target=state.work, daemon=True) for _ in range(min(threads, len(todo)))]
    for w in workers:
        w.start()
    last_checkpoint = time.monotonic()
    for w in workers:
        while w.is_alive() and not stop.is_set():
            w.join(timeout=0.2)
            if checkpoint is not None and time.monotonic() - last_checkpoint >= checkpoint_seconds:
                with state.lock:
                    sizes = writer.flushed_sizes()
                _try_checkpoint(checkpoint, sizes, job.shard_id)
                last_checkpoint = time.monotonic()
    with state.lock:
        state.closed = True  # threads still in a request drop their row: it is fetched again next run
        if state.error is not None:
            writer.close()
            raise DataError(
                f"{folder}: cannot write shard {job.shard_id:05d} ({state.error})"
            ) from state.error
        if len(writer.records) < len(job.rows):
            writer.close()
            return result
        try:
            result.stats = writer.finalize()
        except OSError as exc:
            raise DataError(f"{folder}: cannot complete shard {job.shard_id:05d} ({exc})") from exc
    result.completed = True
    return result


_NO_URL = object()


def _try_checkpoint(checkpoint: Callable[[int, int], None], sizes: tuple[int, int], shard_id: int) -> None:
    try:
        checkpoint(*sizes)
    except Exception as exc:  # a failed upload costs at most a refetch after a kill, never the shard
        log.warning("shard %05d: checkpoint upload failed (%s); continuing", shard_id, exc)


def _not_transient(record: dict[str, Any]) -> bool:
    return record["status"] == "success" or record.get("error_kind") not in TRANSIENT_KINDS


class _ShardState:
    """The work queue and the writer, shared by a shard's threads."""

    def __init__(self, job, writer, fetcher, image, budget, todo, stop, report, result) -> None:
        self.job, self.writer, self.fetcher, self.image, self.budget = job, writer, fetcher, image, budget
        self.todo, self.stop, self.report, self.result = todo, stop, report, result
        self.lock = threading.Lock()
        self.closed = False
        self.error: OSError | None = None

    def work(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    if not self.todo or self.closed:
                        return
                    index, row = self.todo.popleft()
                key = shard_key(self.job.shard_id, index, self.job.shard_size)
                record, jpeg = process_row(key, row, self.fetcher, self.image, self.budget)
                if not self._store(record, jpeg):
                    return
        finally:
            self.fetcher.close()

    def _store(self, record: dict[str, Any], jpeg: bytes | None) -> bool:
        with self.lock:
            if self.closed or self.error is not None:
                return False
            try:
                self.writer.add(record, jpeg)
            except OSError as exc:  # disk full or similar: stop the shard, report once
                self.error = exc
                return False
            res = self.result
            res.processed += 1
            res.statuses[record["status"]] += 1
            if record["error_kind"]:
                res.error_kinds[record["error_kind"]] += 1
                res.examples.setdefault(record["error_kind"], record["error_message"])
            self.report(record["status"] == "success")
            return True


def process_row(
    key: str, row: UrlRow, fetcher: Fetcher, image: ImageConfig, budget: DecodeBudget | None = None
) -> tuple[dict[str, Any], bytes | None]:
    """One input row → its record (img2dataset's fields plus ``error_kind``) and the JPEG on success."""
    record: dict[str, Any] = {
        "key": key,
        "url": row.url,
        "caption": row.caption,
        "status": "failed_to_download",
        "error_message": None,
        "error_kind": None,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "sha256": None,
    }
    try:
        body = fetcher.fetch(row.url)
    except FetchError as exc:
        return _failed(record, "failed_to_download", exc.kind, str(exc)), None
    except Exception as exc:  # a bug must cost one row, not the run
        log.debug("unexpected error fetching %s", row.url, exc_info=True)
        return _failed(record, "failed_to_download", "internal", f"{type(exc).__name__}: {exc}"), None
    try:
        out = process_image(
            body, image.size, image.resize_mode, image.jpeg_quality, image.min_size, image.max_pixels, budget
        )
    except ImageError as exc:
        return _failed(record, "failed_to_resize", exc.kind, str(exc)), None
    except Exception as exc:  # Pillow plugins raise a zoo of types on hostile input
        return _failed(record, "failed_to_resize", "decode_error", f"{type(exc).__name__}: {exc}"), None
    record.update(
        status="success",
        width=out.width,
        height=out.height,
        original_width=out.original_width,
        original_height=out.original_height,
        sha256=hashlib.sha256(body).hexdigest(),
    )
    return record, out.jpeg


def _failed(record: dict[str, Any], status: str, kind: str, message: str) -> dict[str, Any]:
    record.update(status=status, error_kind=kind, error_message=message)
    return record
