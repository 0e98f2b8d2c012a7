"""The one rich console for human output, logging setup, and progress callbacks for the library.

Human output goes to stdout (``console``); errors, logs and progress go to stderr (``err_console``),
so stdout stays clean for ``--json`` and pipes. Library code reports progress through plain callbacks;
``progress_bar`` turns one into a rich bar on a terminal (and into nothing otherwise: the library then
logs a line now and then by itself).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# (done, total or None) → None: what run_curate, run_eval and friends call after each batch.
CountProgress = Callable[[int, "int | None"], None]


def is_interactive() -> bool:
    """True when progress bars make sense (stderr is a terminal)."""
    return err_console.is_terminal


def warn(message: str) -> None:
    """One plain line on stderr (never markup: paths may hold brackets)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def setup_logging(quiet: bool = False) -> None:
    """Log ``mgpt4.*`` to stderr: rich formatting on a TTY, plain timestamped lines otherwise."""
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("mgpt4")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    if is_interactive():
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool = False) -> Iterator[CountProgress | None]:
    """A ``(done, total)`` callback drawing a transient rich bar on stderr; None when not on a TTY."""
    if quiet or not is_interactive():
        yield None
        return
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


class StepBar:
    """Training progress: call it with each step's metrics record and ``train.max_steps``."""

    def __init__(self, status: Callable[[dict], str]) -> None:
        self._status = status
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
        )  # fmt: skip
        self._task = None

    def __call__(self, record: dict, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task("train", total=total, completed=record["step"] - 1, status="")
            self._bar.start()
        self._bar.update(self._task, completed=record["step"], status=self._status(record))

    def close(self) -> None:
        self._bar.stop()


@contextlib.contextmanager
def step_bar(quiet: bool = False) -> Iterator[StepBar | None]:
    """A ``StepBar`` on a terminal (stopped on exit), else None (the trainer logs lines itself)."""
    if quiet or not is_interactive():
        yield None
        return
    from mgpt4.train.metrics import step_status

    bar = StepBar(step_status)
    try:
        yield bar
    finally:
        bar.close()
