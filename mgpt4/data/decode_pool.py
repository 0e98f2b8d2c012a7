"""Worker processes that decode samples for the training process: tasks go in, results come back by ticket.

Stage 1 reads shard members, decodes JPEGs and resizes them in these processes, so that the training
step does not wait on them (``ShardMixture(num_workers=N)``). Which sample comes next is decided in the
training process; a worker only turns a task into a result, and the caller asks for a result by its
ticket, so the order in which workers finish does not matter.

Not torch's ``DataLoader``: its workers take indices fixed ahead by a sampler and return results strictly
in that order, while the mixture decides its next task from what came back (a bad sample needs a
replacement from the same shard set); and it reports a dead worker from a SIGCHLD handler, i.e. as an
exception raised at whatever line the training process is running (mid-step, mid-save). Here a dead
worker is noticed where a result is waited for and raised there, as one ``DataError``.

Images travel through **slots**: tensors of one fixed shape in shared memory, made before the workers
are forked. A worker writes a sample's image tensor into the slot its task names and sends only the
small rest through a pipe; the training process copies the image out and frees the slot. Sending each
tensor through ``torch.multiprocessing`` instead (a new shared-memory segment and a file-descriptor
handshake per tensor) capped 2 workers at 455 images/s of 3x224x224 on a busy 2-core machine, pickling
numpy arrays at 1050/s, slots at 21000/s for the transport alone (measured). Tensors of another shape
still go through ``torch.multiprocessing``.

Workers are forked (DataLoader's default on Linux), so the decode function, its transform and the slots
are inherited, never pickled. Each uses one intra-op thread (as DataLoader workers do: with two, torch's
normalise of one 224-px image took 40 ms instead of 0.5 ms on a busy 2-core machine), ignores SIGINT (the
training process handles Ctrl-C), and exits by itself within ``_PARENT_CHECK_S`` once the training
process is gone, even when that one was SIGKILLed.
"""

from __future__ import annotations

import collections
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
_SHARED_MEMORY = "/dev/shm"  # where torch's shared-memory tensors live on Linux (shm_open)


class _InSlot:
    """Stands in a result for the tensor that was written to the task's slot."""


def fork_available() -> bool:
    """Whether worker processes can be forked here (Linux, macOS; not Windows)."""
    return "fork" in torch.multiprocessing.get_all_start_methods()


class DecodePool:
    """``workers`` processes running ``decode(task)``; ``submit`` a task, then ask for its ``result``.

    Args:
        decode: what a worker does with a task; it runs in a forked child, so it may be any callable.
            Its result may be a tensor, or a tuple or list holding tensors.
        workers: number of processes (at least 1).
        slot_like: a tensor shaped like the images ``decode`` returns; results' tensors of its shape and
            dtype then travel through ``slots`` shared-memory slots (None: all through torch's queues).
        slots: how many; a task waits here, unsent, while all are in use.
        name: process name prefix (shown in errors and by ``ps``).

    Raises:
        UsageError: this platform cannot fork.
    """

    def __init__(
        self,
        decode: Callable[[Any], Any],
        workers: int,
        slot_like: torch.Tensor | None = None,
        slots: int = 0,
        name: str = "mgpt4-loader",
    ) -> None:
        if not fork_available():
            raise UsageError(
                "data.num_workers: loader workers need the fork start method; set data.num_workers=0"
            )
        self._slots = None
        if slot_like is not None and slots > 0:
            _check_shared_memory(slots * slot_like.nbytes)
            self._slots = torch.empty((slots, *slot_like.shape), dtype=slot_like.dtype).share_memory_()
        self._free = list(range(slots if self._slots is not None else 0))
        self._backlog: collections.deque[tuple[int, Any]] = collections.deque()  # waiting for a slot
        context = torch.multiprocessing.get_context("fork")
        self._tasks = context.Queue()
        self._results = context.Queue()
        self._done: dict[int, tuple[str, Any]] = {}
        self._wanted: set[int] = set()
        self.processes = [
            context.Process(target=_work, args=(decode, self._tasks, self._results, os.getpid(), self._slots),
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
        if self._slots is None:
            self._tasks.put((ticket, task, None))
        elif self._free:
            self._tasks.put((ticket, task, self._free.pop()))
        else:
            self._backlog.append((ticket, task))

    def result(self, ticket: int) -> Any:
        """What ``decode`` returned for the task submitted under ``ticket`` (waits for it).

        Raises:
            DataError: a worker died (killed, out of memory, crashed) — one line naming it.
            RuntimeError: ``decode`` raised in the worker (a bug: the worker's traceback is included).
        """
        while ticket not in self._done:
            self._check_alive()
            try:
                got, slot, (status, value) = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            except (OSError, EOFError) as exc:
                # A tensor outside the slots is fetched from its worker while unpickling: the worker
                # died between sending it and handing it over.
                self._wait_for_a_death(exc)
            if slot is not None:
                value = _from_slot(value, self._slots[slot])
                self._free.append(slot)
                while self._backlog and self._free:
                    waiting, task = self._backlog.popleft()
                    self._tasks.put((waiting, task, self._free.pop()))
            if got in self._wanted:  # others were submitted before a ``forget``
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
        self._backlog.clear()

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


def _check_shared_memory(needed: int, where: str = _SHARED_MEMORY) -> None:
    """Refuse slots that do not fit the free shared memory, before touching it.

    Shared memory is a tmpfs: it is sized when written, and a write past its end kills the writer with
    SIGBUS, with no message (Docker gives containers 64 MiB unless ``--shm-size`` says otherwise).
    """
    try:
        stats = os.statvfs(where)
    except OSError:  # not Linux, or no such mount: nothing to check against
        return
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise DataError(
            f"data loader workers need {needed / 2**20:.1f} MiB of shared memory, {where} has "
            f"{free / 2**20:.1f} MiB free: give it more (docker run --shm-size=1g), lower data.prefetch or "
            "set data.num_workers=0"
        )


def _to_slot(value: Any, slot: torch.Tensor) -> Any:
    """``value`` with its first tensor shaped like ``slot`` written into it and replaced by ``_InSlot()``."""
    if isinstance(value, torch.Tensor) and value.shape == slot.shape and value.dtype == slot.dtype:
        slot.copy_(value)
        return _InSlot()
    if isinstance(value, tuple | list):
        items = list(value)
        for index, item in enumerate(items):
            moved = _to_slot(item, slot)
            if isinstance(moved, _InSlot):
                items[index] = moved
                return type(value)(items)
    return value


def _from_slot(value: Any, slot: torch.Tensor) -> Any:
    """``value`` with ``_InSlot()`` replaced by a copy of the slot (which is then free again)."""
    if isinstance(value, _InSlot):
        return slot.clone()
    if isinstance(value, tuple | list):
        return type(value)(_from_slot(item, slot) for item in value)
    return value


def _owned(value: Any) -> Any:
    """``value`` with tensors received through torch's queues copied out of their shared memory.

    Such a tensor keeps a file descriptor open for as long as it lives (torch's ``file_descriptor``
    sharing): results held across a long prefetch window, or a batch of samples waiting to be
    stacked, would hold one each and can exhaust ``ulimit -n`` (1024 on many machines).
    """
    if isinstance(value, torch.Tensor) and value.is_shared():
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


def _work(decode: Callable[[Any], Any], tasks, results, parent: int, slots: torch.Tensor | None) -> None:
    """A worker's loop: take a task, put ``(ticket, slot, ("ok", result) | ("error", traceback))``."""
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
        ticket, task, slot = item
        try:
            value = decode(task)
            outcome = ("ok", _to_slot(value, slots[slot]) if slot is not None else value)
        except Exception:  # noqa: BLE001 - handed to the training process, which raises it
            outcome = ("error", traceback.format_exc())
        results.put((ticket, slot, outcome))
