"""Terminal rendering of ``mgpt4 download`` (the CLI's side): a rich progress bar and the summary table.

Kept apart from the library (``mgpt4.download``), which only counts and returns data; the CLI imports
this module. (The one-face redesign moves it into ``mgpt4/cli/download.py``.)
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mgpt4.console import err_console
from mgpt4.download.fetch import TRANSIENT_KINDS
from mgpt4.download.progress import DownloadStatus


class ProgressBar:
    """A rich bar on stderr (rows, images/s, success rate, ETA); call it with each ``DownloadStatus``."""

    def __init__(self, console: Console = err_console) -> None:
        self._bar = Progress(
            TextColumn("[bold]download"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.1f} img/s"),
            TextColumn("ok {task.fields[ok_pct]:>5.1f}%"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task("download", total=None, rate=0.0, ok_pct=0.0)

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def __call__(self, status: DownloadStatus) -> None:
        self._bar.update(
            self._task,
            completed=status.completed,
            total=status.total,
            rate=status.images_per_s,
            ok_pct=status.ok_pct,
        )


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """The end-of-run table: this run's counts by error reason, and the folder's totals."""
    run = summary["run"]
    shards = summary["shards"]
    if summary.get("scope") == "folder":  # `mgpt4 download report`: every shard, whichever run wrote it
        head = f"{run['rows']} rows in complete shards, {run['seconds']:.1f} s from first to last shard"
        tail = f"shards: {shards['written']} complete, {shards['incomplete']} incomplete"
        if shards.get("missing") is not None:
            tail += f", {shards['missing']} not started"
    else:
        head = f"{run['rows']} rows fetched in {run['seconds']:.1f} s"
        tail = (
            f"shards: {shards['written']} written, {shards['skipped']} already complete, "
            f"{shards['incomplete']} incomplete"
        )
    console.print(
        f"[bold]{summary['output']}[/]: {head} — {run['successes']} ok ({run['success_rate'] * 100:.1f}%), "
        f"{run['images_per_s']:.1f} img/s; {tail}"
    )
    if run["error_kinds"]:
        table = Table(title=f"failures by reason ({_scope(summary)})", title_justify="left")
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


def _scope(summary: dict[str, Any]) -> str:
    return "every complete shard" if summary.get("scope") == "folder" else "this run"
