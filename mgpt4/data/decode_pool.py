"""Worker processes that decode samples for the training process: tasks go in, results come back by ticket.

Stage 1 reads shard members, decodes JPEGs and resizes them in these processes, so that the training
step does not wait on them (``ShardMixture(num_workers=N)``). Which sample comes next is decided in the
training process; a worker only turns a task into a result, and the caller asks for a result by its
ticket, so the order in which workers finish does not matter.

Not torch's ``DataLoader``: its workers take indices fixed ahead by a sampler and return results strictly
in that order, while the mixture decides its next task from what came back (a bad sample needs a
replacement from the same shard set); and it reports a dead worker from a SIGCHLD handler, i.e. as an
exception raised at whatever line the training process is running (mid-step, mid-save). Here a dead
worker is noticed where a result is waited for and raised there, as one ``DataError``. What is reused
from torch is the transport: ``torch.multiprocessing`` queues pass result tensors through shared memory.

Workers are forked (DataLoader's default on Linux), so the decode function and its transform are
inherited, never pickled. Each uses one intra-op thread (as DataLoader workers do), ignores SIGINT (the
training process handles Ctrl-C), and exits by itself within ``_PARENT_CHECK_S`` once the training
process is gone, even when that one was SIGKILLed.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
import typing
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing

from mgpt4.errors import DataError, UsageError

_PARENT_CHECK_S = 1.0  # an idle worker checks this often whether the training process still exists
_POLL_S = 0.2  # how often a wait for a result checks that every worker is alive
_DEATH_WAIT_S = 5.0  # a lost result: how long to wait for the kernel to report the worker that died
_STOP = None  # the task that ends a worker


def fork_available() -> bool:
    """Whether worker processes can be forked here (Linux, macOS; not Windows)."""
    return "fork" in torch.multiprocessing.get_all_start_methods()


class DecodePool:
    """``workers`` processes running ``decode(task)``; ``submit`` a task, then ask for its ``result``.

    Args:
        decode: what a worker does with a task; it runs in a forked child, so it may be any callable.
        workers: number of processes (at least 1).
        name: process name prefix (shown in errors and by ``ps``).

    Raises:
        UsageError: this platform cannot fork.
    """

    def __init__(self, decode: Callable[[Any], Any], workers: int, name: str = "mgpt4-loader") -> None:
        if not fork_available():
            raise UsageError(
                "data.num_workers: loader workers need the fork start method; set data.num_workers=0"
            )
        context = torch.multiprocessing.get_context("fork")
        self._tasks = context.Queue()
        self._results = context.Queue()
        self._done: dict[int, tuple[str, Any]] = {}
        self._wanted: set[int] = set()
        self.processes = [
            context.Process(target=_work, args=(decode, self._tasks, self._results, os.getpid()),
                            name=f"{name}-{index}", daemon=True)
            for index in range(workers)
        ]  # fmt: skip
        for process in self.processes:
            process.start()
        self._finalizer = weakref.finalize(self, _shut_down, self.processes, self._tasks, self._results)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def submit(self, ticket: int, task: Any) -> None:
        """Queue ``task``; its result is kept under ``ticket`` until asked for."""
        self._wanted.add(ticket)
        self._tasks.put((ticket, task))

    def result(self, ticket: int) -> Any:
        """What ``decode`` returned for the task submitted under ``ticket`` (waits for it).

        Raises:
            DataError: a worker died (killed, out of memory, crashed) — one line naming it.
            RuntimeError: ``decode`` raised in the worker (a bug: the worker's traceback is included).
        """
        while ticket not in self._done:
            self._check_alive()
            try:
                got, outcome = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            except (OSError, EOFError) as exc:
                # A result tensor is fetched from its worker while unpickling (shared-memory handle):
                # the worker died between sending it and handing it over.
                self._wait_for_a_death(exc)
            if got in self._wanted:  # others were submitted before a ``forget``
                status, value = outcome
                self._done[got] = (status, _owned(value))
        self._wanted.discard(ticket)
        status, value = self._done.pop(ticket)
        if status == "error":
            raise RuntimeError(f"a data loader worker failed:\n{value}")
        return value

    def forget(self) -> None:
        """Drop every outstanding ticket: results still coming for them are discarded."""
        self._wanted.clear()
        self._done.clear()

    def _wait_for_a_death(self, exc: BaseException) -> typing.NoReturn:
        deadline = time.monotonic() + _DEATH_WAIT_S
        while time.monotonic() < deadline:
            self._check_alive()  # raises once the kernel reports the dead worker
            time.sleep(0.05)
        self.close()
        raise DataError(f"lost a result of a data loader worker ({exc}); rerun the same command to resume")

    def _check_alive(self) -> None:
        for process in self.processes:
            code = process.exitcode
            if code is None:
                continue
            if code < 0:
                name = signal.Signals(-code).name
                how = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
            else:
                how = f"exited with code {code}"
            self.close()
            raise DataError(
                f"data loader worker {process.name} (pid {process.pid}) {how}; training stopped — rerun the "
                "same command to resume from the last checkpoint (data.num_workers=0 decodes in the training "
                "process instead)"
            )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()


def _owned(value: Any) -> Any:
    """``value`` with its tensors copied out of shared memory (top level and inside tuples/lists).

    A tensor received from a worker keeps a file descriptor open for as long as it lives (torch's
    ``file_descriptor`` sharing): results held across a long prefetch window, or a batch of samples
    waiting to be stacked, would otherwise hold one each and can exhaust ``ulimit -n`` (1024 on many
    machines). Copying a 3x224x224 float image took 0.4 ms on a busy 2-core machine (measured).
    """
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_owned(item) for item in value)
    return value


def _shut_down(processes: list, tasks, results) -> None:
    for process in processes:
        if process.exitcode is None:
            try:
                tasks.put(_STOP)
            except (OSError, ValueError):
                break
    for process in processes:
        process.join(timeout=2)
        if process.exitcode is None:
            process.kill()
            process.join(timeout=2)
    for channel in (tasks, results):
        channel.cancel_join_thread()  # never wait at exit to flush tasks nobody will read
        channel.close()


def _work(decode: Callable[[Any], Any], tasks, results, parent: int) -> None:
    """A worker's loop: take a task, put ``(ticket, ("ok", result) | ("error", traceback))``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    results.cancel_join_thread()  # a worker whose parent is gone must not hang at exit flushing results
    while True:
        try:
            item = tasks.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent:  # re-parented: the training process is gone
                return
            continue
        if item is _STOP:
            return
        ticket, task = item
        try:
            outcome = ("ok", decode(task))
        except Exception:  # noqa: BLE001 - handed to the training process, which raises it
            outcome = ("error", traceback.format_exc())
        results.put((ticket, outcome))
