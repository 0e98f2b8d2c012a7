"""What a download shows while it runs and when it ends.

On a terminal: a rich progress bar on stderr (rows, images/s, success rate, ETA). Elsewhere (CI, a log
file, ``nohup``): one plain log line every ``log_every`` seconds. At the end: a summary table of
counts by error reason (``render_summary``), or the same data as JSON for scripts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mgpt4.console import err_console
from mgpt4.data.fetch import TRANSIENT_KINDS

log = logging.getLogger("mgpt4.download")


class DownloadProgress:
    """Counts rows as they finish; draws a bar on a TTY or logs a line now and then otherwise."""

    def __init__(self, total: int | None, show_bar: bool, log_every: float = 10.0) -> None:
        self.total = total
        self.done = self.ok = self.skipped = 0
        self.start = time.monotonic()
        self._log_every = log_every
        self._last_log = self.start
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task: Any = None
        if show_bar:
            self._bar = Progress(
                TextColumn("[bold]download"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7.1f} img/s"),
                TextColumn("ok {task.fields[ok_pct]:>5.1f}%"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )

    def __enter__(self) -> DownloadProgress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task("download", total=self.total, rate=0.0, ok_pct=0.0)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self._refresh(force=True)  # where an interrupted run stopped is worth a line; an error is not
        if self._bar is not None:
            self._bar.stop()

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

    @property
    def images_per_s(self) -> float:
        """Successful images per second in this run."""
        return self.ok / max(time.monotonic() - self.start, 1e-9)

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            ok_pct = 100.0 * self.ok / self.done if self.done else 0.0
            completed = self.done + self.skipped
            if self._bar is not None:
                self._bar.update(
                    self._task, completed=completed, total=self.total, rate=self.images_per_s, ok_pct=ok_pct
                )
                return
            now = time.monotonic()
            if not force and now - self._last_log < self._log_every:
                return
            self._last_log = now
            of_total = f"/{self.total}" if self.total else ""
            eta = ""
            rows_per_s = self.done / max(now - self.start, 1e-9)
            if self.total and rows_per_s > 0 and completed < self.total:
                eta = f", ETA {_duration((self.total - completed) / rows_per_s)}"
        log.info(
            "%d%s rows done, %d ok (%.1f%%), %.1f img/s%s",
            completed,
            of_total,
            self.ok,
            ok_pct,
            self.images_per_s,
            eta,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """The end-of-run table: this run's counts by error reason, and the folder's totals."""
    run = summary["run"]
    console.print(
        f"[bold]{summary['output']}[/]: {run['rows']} rows fetched in {run['seconds']:.1f} s — "
        f"{run['successes']} ok ({run['success_rate'] * 100:.1f}%), {run['images_per_s']:.1f} img/s; "
        f"shards: {summary['shards']['written']} written, {summary['shards']['skipped']} already complete, "
        f"{summary['shards']['incomplete']} incomplete"
    )
    if run["error_kinds"]:
        table = Table(title="failures by reason (this run)", title_justify="left")
        table.add_column("reason")
        table.add_column("rows", justify="right")
        table.add_column("share", justify="right")
        table.add_column("retry", justify="center")
        table.add_column("example", overflow="fold")
        for kind, count in sorted(run["error_kinds"].items(), key=lambda kv: -kv[1]):
            share = f"{100 * count / max(run['rows'], 1):.1f}%"
            retry = "yes" if kind in TRANSIENT_KINDS else ""
            table.add_row(kind, str(count), share, retry, run["examples"].get(kind, ""))
        console.print(table)
        if any(kind in TRANSIENT_KINDS for kind in run["error_kinds"]):
            console.print("rows marked 'retry' failed for transient reasons: rerun with --retry-failed")
    total = summary["dataset"]
    console.print(
        f"folder total: {total['successes']} images from {total['rows']} rows in {total['shards']} "
        "complete shards"
    )
