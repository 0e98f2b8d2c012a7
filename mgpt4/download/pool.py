"""The shard workers of ``mgpt4 download``: a process pool (or one in-process worker), fed shard by shard.

Each worker process downloads one shard at a time (``download_shard``) and sends finished-row counts
back through a queue every ~0.3 s; the parent draws progress from them. Stopping is cooperative: the
parent owns Ctrl-C / SIGTERM and sets a shared flag, workers stop taking rows, leave their partial
files for the next run and return. A worker whose parent died (kill -9) stops the same way instead of
finishing its shard alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mgpt4.download.decode_budget import DecodeBudget, release_freed_bitmaps
from mgpt4.download.fetch import Fetcher
from mgpt4.download.progress import DownloadProgress
from mgpt4.download.shard_download import ShardJob, ShardResult
from mgpt4.download.worker import BatchedReport, WorkerSpec, run_shard
from mgpt4.errors import DataError

log = logging.getLogger("mgpt4.download")


@dataclasses.dataclass
class Skipped:
    """A shard an earlier run completed."""

    shard_id: int
    rows: int


class _StopFlag:
    """Set by the parent, or implied when the parent is gone."""

    def __init__(self, flag: Any, parent_pid: int | None) -> None:
        self._flag = flag
        self._parent_pid = parent_pid

    def is_set(self) -> bool:
        return self._flag.is_set() or (self._parent_pid is not None and os.getppid() != self._parent_pid)


_worker: dict[str, Any] = {}  # per worker: spec, fetcher, decode budget, stop flag, progress queue


def _init_worker(spec: WorkerSpec, progress_queue: Any, stop: Any, parent_pid: int | None) -> None:
    if parent_pid is not None:  # a child process: the parent owns Ctrl-C and sets `stop`
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    release_freed_bitmaps()
    _worker.update(
        spec=spec,
        queue=progress_queue,
        stop=_StopFlag(stop, parent_pid),
        fetcher=Fetcher(spec.fetch),
        budget=DecodeBudget(spec.decode_memory),
    )


def _exit_when_orphaned(parent_pid: int) -> None:
    """A pool worker whose parent was killed would wait for work forever, holding the folder lock.

    Exiting at any instant is safe: the shard's partial files are salvaged by the next run.
    """
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    time.sleep(1.0)  # grace: the stop flag already tells the shard's threads to finish their rows
    os._exit(1)


def _run_job(job: ShardJob) -> ShardResult:
    """In a worker: download one shard, reporting finished rows every ~0.3 s."""
    w = _worker
    report = BatchedReport(lambda ok, failed: w["queue"].put((ok, failed)))
    try:
        return run_shard(w["spec"], job, w["fetcher"], w["budget"], w["stop"], report)
    finally:
        report.flush()


class ShardPool:
    """The workers plus their progress queue and stop flag.

    Worker processes are forked here, before the progress bar starts its thread: a child forked while
    another thread holds a lock (the console's, logging's) would inherit that lock held forever.
    """

    def __init__(self, spec: WorkerSpec, processes: int) -> None:
        self.size = processes
        if processes == 1:  # no pool to pay for: the same code path, in this process
            self.queue: Any = queue.Queue()
            self.stop: Any = threading.Event()
            self.executor: Executor = ThreadPoolExecutor(
                1, initializer=_init_worker, initargs=(spec, self.queue, self.stop, None)
            )
            return
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.queue, self.stop = ctx.Queue(), ctx.Event()
        self.executor = ProcessPoolExecutor(
            processes,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(spec, self.queue, self.stop, os.getpid()),
        )
        # Python < 3.12 starts workers on demand; make them all exist now (see the class docstring).
        list(self.executor.map(time.sleep, [0.05] * processes))

    def close(self) -> None:
        """Wait for the workers to exit."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def execute(
    plan: Iterable[ShardJob | Skipped], pool: ShardPool, progress: DownloadProgress
) -> tuple[list[ShardResult], Counter]:
    """Run every job of ``plan`` on ``pool``; returns the results and shard counts by outcome.

    Raises:
        KeyboardInterrupt: after asking the workers to stop and waiting (briefly) for them.
        DataError: a worker process died.
    """
    results: list[ShardResult] = []
    shards: Counter = Counter()
    pending: set[Future] = set()
    try:
        for item in plan:
            if isinstance(item, Skipped):
                shards["skipped"] += 1
                progress.skip(item.rows)
                continue
            while len(pending) >= 2 * pool.size:  # keeps memory bounded: the plan is read lazily
                pending = _collect(pending, pool.queue, progress, results, shards)
            pending.add(pool.executor.submit(_run_job, item))
        while pending:
            pending = _collect(pending, pool.queue, progress, results, shards)
    except KeyboardInterrupt:
        pool.stop.set()
        log.warning("interrupted: stopping; rerun the same command to resume")
        wait(pending, timeout=30)
        raise
    finally:
        pool.close()
        _drain(pool.queue, progress)
    return results, shards


def _collect(
    pending: set[Future],
    progress_queue: Any,
    progress: DownloadProgress,
    results: list[ShardResult],
    shards: Counter,
) -> set[Future]:
    done, still = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
    _drain(progress_queue, progress)
    for fut in done:
        try:
            result = fut.result()
        except BrokenProcessPool as exc:
            raise DataError(
                "a download worker process died (out of memory?); rerun the same command to resume"
            ) from exc
        results.append(result)
        shards["written" if result.completed else "incomplete"] += 1
    return still


def _drain(progress_queue: Any, progress: DownloadProgress) -> None:
    ok = failed = 0
    while True:
        try:
            a, b = progress_queue.get_nowait()
        except (queue.Empty, OSError, ValueError):
            break
        ok, failed = ok + a, failed + b
    if ok or failed:
        progress.advance(ok, failed)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill` gets the same clean stop as Ctrl-C (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
