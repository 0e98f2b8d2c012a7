"""A per-process budget of decoded-image bytes, shared by the download threads of one worker process.

Without it a process's peak memory is chosen by its inputs: 12 threads each decoding an 8000×8000 PNG
hold 12 full-size bitmaps at once (5.4 GB peak RSS measured; 325 MB with the default 512 MiB budget,
which lets one such image, 768 MB by its estimate, decode at a time). Each thread reserves an image's
estimated decode cost (``mgpt4.download.resize.decode_cost``, from the header, before a pixel is decoded)
and waits while the reservations in flight would exceed the budget, so the bitmaps alive at once stay
within it.

Waiting is first come, first served: a large image is not starved by a stream of small ones. An image
whose cost alone exceeds the budget waits until nothing else is decoding and then decodes by itself,
so the peak is ``max(budget, one image)``, where one image is capped by ``image.max_pixels``. (Refusing
it instead would make which rows succeed depend on a memory setting rather than on the data.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD = 1 << 20


class DecodeBudget:
    """A first-come-first-served weighted semaphore over ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"decode budget must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0  # the most bytes reserved at once, for logs and tests
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @property
    def waiting(self) -> int:
        """Threads waiting for room."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` (at most the whole budget) while the block runs; waits for room first."""
        weight = min(max(int(nbytes), 0), self.capacity)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.in_use + weight > self.capacity:
                self._cond.wait()
            self._queue.popleft()
            self.in_use += weight
            self.peak = max(self.peak, self.in_use)
            self._cond.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= weight
                self._cond.notify_all()


def release_freed_bitmaps() -> None:
    """Have glibc serve every allocation of 1 MiB or more (image bitmaps) by mmap, returned when freed.

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), after which
    bitmaps come from per-thread malloc arenas that keep what is freed: every thread then holds on to
    about the largest image it decoded, and RSS grows with the thread count even while the budget lets
    one image decode at a time (12 threads, 4000×2000 PNGs one at a time: 438 MB peak RSS, 102 MB with
    this set). Setting the threshold also turns that adjustment off.
    A no-op where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
