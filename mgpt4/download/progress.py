"""How far a download is: row counts as shards report them, handed to a callback or logged.

The library only counts. A caller that wants a progress bar passes ``progress=`` to ``run_download``
and gets a ``DownloadStatus`` after every update (the CLI draws a rich bar from it on a terminal,
``mgpt4.cli.download``); without a callback one plain log line is written every ``log_every``
seconds (CI, a log file, ``nohup``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("mgpt4.download")


@dataclasses.dataclass(frozen=True)
class DownloadStatus:
    """A snapshot of a running download."""

    done: int  # rows finished in this run (success or failure)
    ok: int  # of which successes
    skipped: int  # rows of shards an earlier run completed
    total: int | None  # every input row (None until known)
    seconds: float  # since this run started

    @property
    def completed(self) -> int:
        """Rows accounted for: finished now or earlier."""
        return self.done + self.skipped

    @property
    def images_per_s(self) -> float:
        """Successful images per second in this run."""
        return self.ok / max(self.seconds, 1e-9)

    @property
    def ok_pct(self) -> float:
        """Share of this run's finished rows that succeeded, in percent."""
        return 100.0 * self.ok / self.done if self.done else 0.0


ProgressCallback = Callable[[DownloadStatus], None]


class DownloadProgress:
    """Counts rows as they finish; calls ``callback`` with each new status, or logs a line now and then."""

    def __init__(self, total: int | None, callback: ProgressCallback | None = None, log_every: float = 10.0):
        self.total = total
        self.done = self.ok = self.skipped = 0
        self.start = time.monotonic()
        self._callback = callback
        self._log_every = log_every
        self._last_log = self.start
        self._lock = threading.Lock()

    def __enter__(self) -> DownloadProgress:
        if self._callback is not None:
            self._callback(self.status())  # a bar appears at once, at 0
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self._refresh(force=True)  # where an interrupted run stopped is worth a line; an error is not

    def set_total(self, total: int) -> None:
        """The exact row count, once the inputs have been read to the end."""
        with self._lock:
            self.total = total
        self._refresh()

    def skip(self, rows: int) -> None:
        """Rows of shards that an earlier run completed."""
        with self._lock:
            self.skipped += rows
        self._refresh()

    def advance(self, ok: int, failed: int) -> None:
        """Rows finished in this run."""
        with self._lock:
            self.done += ok + failed
            self.ok += ok
        self._refresh()

    def status(self) -> DownloadStatus:
        """The counts now."""
        with self._lock:
            return DownloadStatus(self.done, self.ok, self.skipped, self.total, time.monotonic() - self.start)

    @property
    def images_per_s(self) -> float:
        """Successful images per second in this run."""
        return self.status().images_per_s

    def _refresh(self, force: bool = False) -> None:
        status = self.status()
        if self._callback is not None:
            self._callback(status)
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_log < self._log_every:
                return
            self._last_log = now
        of_total = f"/{status.total}" if status.total else ""
        eta = ""
        rows_per_s = status.done / max(status.seconds, 1e-9)
        if status.total and rows_per_s > 0 and status.completed < status.total:
            eta = f", ETA {_duration((status.total - status.completed) / rows_per_s)}"
        log.info(
            "%d%s rows done, %d ok (%.1f%%), %.1f img/s%s",
            status.completed,
            of_total,
            status.ok,
            status.ok_pct,
            status.images_per_s,
            eta,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
