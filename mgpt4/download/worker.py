"""What a worker does with one shard, whichever distributor runs it (local processes or Ray tasks).

A local output is written in place (``download_shard`` on the folder). A remote output is written in a
local staging folder and published through fsspec (``mgpt4.download.remote_shard``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mgpt4.download.decode_budget import DecodeBudget
from mgpt4.download.fetch import FetchConfig, Fetcher
from mgpt4.download.resize import ImageConfig
from mgpt4.download.shard_download import ShardJob, ShardResult, StopFlag, download_shard
from mgpt4.download.storage import is_url
from mgpt4.errors import DataError

log = logging.getLogger("mgpt4.download")


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs: where to write and how to fetch and store."""

    output: str  # a local folder or an fsspec URL
    fetch: FetchConfig
    image: ImageConfig
    threads: int
    decode_memory: int  # bytes of decoded images per process (mgpt4.download.decode_budget)
    checkpoint_seconds: float = 60.0  # remote output: seconds between uploads of an unfinished shard


class BatchedReport:
    """The ``report(ok)`` callback of a shard: counts rows and sends ``(ok, failed)`` at most every 0.3 s
    (to a queue, a Ray actor), so progress costs one message per interval, not one per row."""

    def __init__(self, send: Callable[[int, int], None], every: float = 0.3) -> None:
        self._send = send
        self._every = every
        self._counts = [0, 0]  # ok, failed since the last send
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, ok: bool) -> None:
        with self._lock:
            self._counts[0 if ok else 1] += 1
            if time.monotonic() - self._last >= self._every:
                self._flush_locked()

    def flush(self) -> None:
        """Send what is counted (at the end of a shard)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        ok, failed = self._counts
        if ok or failed:
            self._send(ok, failed)
        self._counts = [0, 0]
        self._last = time.monotonic()


def run_shard(
    spec: WorkerSpec,
    job: ShardJob,
    fetcher: Fetcher,
    budget: DecodeBudget,
    stop: StopFlag,
    report: Callable[[bool], None],
) -> ShardResult:
    """Download one shard into ``spec.output``.

    Raises:
        DataError: the shard's files cannot be written, here or remotely.
    """
    if not is_url(spec.output):
        return download_shard(job, Path(spec.output), fetcher, spec.image, spec.threads, stop, report, budget)
    from mgpt4.download.remote_shard import RemoteShard
    from mgpt4.download.storage import RemoteFolder

    shard = RemoteShard(RemoteFolder(spec.output), job.shard_id)
    try:
        staging = shard.stage()
        result = download_shard(
            job, staging, fetcher, spec.image, spec.threads, stop, report, budget,
            checkpoint=shard.checkpoint, checkpoint_seconds=spec.checkpoint_seconds,
        )  # fmt: skip
        if result.completed:
            shard.publish()
        else:
            shard.save_partial()
        return result
    except OSError as exc:
        raise DataError(f"{spec.output}: cannot write shard {job.shard_id:05d} ({exc})") from exc
    finally:
        shard.cleanup()
