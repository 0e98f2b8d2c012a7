"""Shards as Ray tasks: ``mgpt4 download --distributor ray [--ray-address auto|HOST:PORT]``.

The driver (the machine running the command) reads the inputs, plans the shards exactly as a local
run does and submits one task per shard (1 CPU each, so a cluster runs as many shards at once as it
has CPUs, as the local pool runs one per process). A task runs the same ``run_shard`` a pool worker
runs, counts rows into a small progress actor that the driver reads every 0.25 s, and returns the
shard's ``ShardResult``; the driver turns those into the same summary.

When a worker process or node dies, Ray runs the task again (``max_retries``). That is safe because a
shard is complete only once its ``_stats.json`` is written, last: the retry salvages the partial files
the dead attempt left (its journal and partial tar on a shared folder; the last checkpoint on a remote
one) and fetches only the rows no file holds. Every node must reach the output: a shared mount for a
plain path, or any fsspec URL (``s3://...``). Ctrl-C / SIGTERM on the driver cancels the tasks, which
stop taking rows and leave their partial files for the next run.

A run's summary counts the rows its tasks' final attempts fetched; rows a dead attempt stored are kept
by the retry (and counted in the folder's totals), not fetched again. A local cluster started by the
command is stopped with it; after a SIGKILL of the driver Ray 2.60 leaves its two agent processes
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) behind, which ``ray stop`` ends.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from mgpt4.download.decode_budget import DecodeBudget, release_freed_bitmaps
from mgpt4.download.fetch import Fetcher
from mgpt4.download.pool import Skipped
from mgpt4.download.progress import DownloadProgress
from mgpt4.download.shard_download import ShardJob, ShardResult
from mgpt4.download.worker import BatchedReport, WorkerSpec, run_shard
from mgpt4.errors import DataError, Mgpt4Error, UsageError

log = logging.getLogger("mgpt4.download")

INSTALL = "pip install 'mgpt4[ray]' (in a checkout: pip install -e '.[ray]')"
MAX_RETRIES = 3  # attempts after the first when a worker dies (Ray's default for tasks)


def require_ray() -> None:
    """Raises UsageError with the install command when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--distributor ray needs Ray, which is not installed: {INSTALL}") from exc


class RayCluster:
    """Joins the cluster at ``address`` (or starts a local one with ``processes`` CPUs) for one run."""

    def __init__(self, address: str | None, processes: int) -> None:
        self.address = address
        self.processes = processes
        self._started = False

    def __enter__(self) -> RayCluster:
        import ray

        if ray.is_initialized():  # a caller (a test, a notebook) already joined one
            return self
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.address is None:
            # "local" starts a fresh cluster even where `ray start` left one running on this machine:
            # with address=None Ray would join that one, which refuses num_cpus.
            options["num_cpus"] = self.processes or None
        else:
            _check_reachable(self.address)
        try:
            ray.init(address=self.address or "local", **options)
        except ConnectionError as exc:
            raise DataError(
                f"cannot reach the Ray cluster at {self.address} ({exc}); if it uses token authentication "
                "(Ray >= 2.59 turns it on for `ray start` clusters), pass --ray-address auto on a node of "
                "the cluster, or set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN off the head node)"
            ) from exc
        self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()

    def execute(
        self, plan: Iterable[ShardJob | Skipped], spec: WorkerSpec, progress: DownloadProgress
    ) -> tuple[list[ShardResult], Counter]:
        """Run every job of ``plan`` as a Ray task; returns the results and shard counts by outcome.

        Raises:
            KeyboardInterrupt: after cancelling the tasks and waiting (briefly) for them to stop.
            DataError: a shard's task failed (its files cannot be written) or its workers kept dying.
        """
        import ray

        tally = ray.remote(num_cpus=0)(_Tally).remote()
        task = ray.remote(_shard_task).options(num_cpus=1, max_retries=MAX_RETRIES)
        width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        results: list[ShardResult] = []
        shards: Counter = Counter()
        pending: dict[Any, int] = {}  # task ref → shard id
        try:
            for item in plan:
                if isinstance(item, Skipped):
                    shards["skipped"] += 1
                    progress.skip(item.rows)
                    continue
                while len(pending) >= 2 * width:  # the plan is read lazily: memory stays bounded
                    self._collect(pending, tally, progress, results, shards)
                pending[task.remote(spec, item, tally)] = item.shard_id
            while pending:
                self._collect(pending, tally, progress, results, shards)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping the Ray tasks; rerun the same command to resume")
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=30)
            raise
        finally:
            _drain(tally, progress)
        return results, shards

    @staticmethod
    def _collect(
        pending: dict[Any, int],
        tally: Any,
        progress: DownloadProgress,
        results: list[ShardResult],
        shards: Counter,
    ) -> None:
        import ray

        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
        _drain(tally, progress)
        for ref in done:
            shard_id = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, Mgpt4Error):
                    raise exc.cause from None
                raise DataError(f"shard {shard_id:05d}: its Ray task failed ({exc.cause!r})") from exc
            except ray.exceptions.RayError as exc:
                raise DataError(
                    f"shard {shard_id:05d}: its Ray workers died {MAX_RETRIES + 1} times "
                    f"({type(exc).__name__}); rerun the same command to resume"
                ) from exc
            results.append(result)
            shards["written" if result.completed else "incomplete"] += 1


def _check_reachable(address: str) -> None:
    """Fail in a second on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "local", ray://…: Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise DataError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
            "is `ray start --head` running there?"
        ) from exc


def _drain(tally: Any, progress: DownloadProgress) -> None:
    import ray

    ok, failed = ray.get(tally.take.remote())
    if ok or failed:
        progress.advance(ok, failed)


class _Tally:
    """A Ray actor: rows finished by every task since the driver last looked."""

    def __init__(self) -> None:
        self.ok = self.failed = 0

    def add(self, ok: int, failed: int) -> None:
        self.ok += ok
        self.failed += failed

    def take(self) -> tuple[int, int]:
        counts = (self.ok, self.failed)
        self.ok = self.failed = 0
        return counts


_process: dict[str, Any] = {}  # per Ray worker process: the spec it was set up for, fetcher, budget


def _shard_task(spec: WorkerSpec, job: ShardJob, tally: Any) -> ShardResult:
    """In a Ray worker: download one shard. Runs it in a thread, so that ``ray.cancel`` (a
    KeyboardInterrupt here) becomes the same cooperative stop the local pool uses."""
    if _process.get("spec") != spec:  # worker processes are reused across tasks and runs
        release_freed_bitmaps()
        _process.update(spec=spec, fetcher=Fetcher(spec.fetch), budget=DecodeBudget(spec.decode_memory))
    report = BatchedReport(lambda ok, failed: tally.add.remote(ok, failed))
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = run_shard(spec, job, _process["fetcher"], _process["budget"], stop, report)
        except BaseException as exc:  # handed to the task's thread, which raises it to Ray
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=f"shard-{job.shard_id:05d}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        thread.join(timeout=30)
        raise
    finally:
        report.flush()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
