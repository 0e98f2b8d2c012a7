"""Terminal output for describe and chat: rich on a TTY, plain text when piped, JSONL for scripts.

The progress bar shares the stdout console when stdout is a terminal (panels and bar then never
fight over the same screen), and uses stderr otherwise so that piped stdout stays clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mgpt4.console import console, err_console
from mgpt4.conversation import STOP_STRING
from mgpt4.infer.describe import DescribeResult


def warn(message: str) -> None:
    """One plain line on stderr (never markup: paths may hold brackets)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


class DescribeOutput:
    """Shows describe results as they arrive: rich panels, plain blocks or JSONL; ``--output`` file too.

    Use as a context manager; the ``--output`` file is written to a temporary name and renamed only
    when the run ends without an exception.
    """

    def __init__(self, as_json: bool, output: str | None, quiet: bool, total: int | None) -> None:
        self.as_json = as_json
        self.output = Path(output) if output else None
        self.quiet = quiet
        self.total = total
        self.done = 0
        self.failed = 0
        self._file: IO[str] | None = None
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> DescribeOutput:
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._tmp_path().open("w", encoding="utf-8")
        bar_console = console if console.is_terminal and not self.as_json else err_console
        if not self.quiet and bar_console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("describing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=bar_console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("describe", total=self.total)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
            if exc_type is None:
                self._tmp_path().replace(self.output)
            else:
                self._tmp_path().unlink(missing_ok=True)

    @property
    def has_progress_bar(self) -> bool:
        return self._progress is not None

    def _tmp_path(self) -> Path:
        assert self.output is not None
        return self.output.with_name(self.output.name + ".tmp")

    def add(self, result: DescribeResult) -> None:
        """Show one result (or report its failure on stderr) and advance the progress bar."""
        self.done += 1
        if self._progress is not None:
            self._progress.advance(self._task)
        if result.error:
            self.failed += 1
            self._print_error(f"skipped {result.image}: {result.error}")
            return
        record = json.dumps(result.to_json(), ensure_ascii=False)
        if self._file is not None:
            self._file.write(record + "\n")
            self._file.flush()
        if self.as_json:
            sys.stdout.write(record + "\n")
            sys.stdout.flush()
        elif self.output is None or not self.quiet:
            self._print_text(result)

    def _print_error(self, message: str) -> None:
        if self._progress is not None and self._progress.console is err_console:
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            warn(message)

    def _print_text(self, result: DescribeResult) -> None:
        if console.is_terminal:
            subtitle = f"{result.tokens} tokens · {result.seconds:.2f} s"
            panel = Panel(
                Text(result.text or "(empty answer)"),
                title=Text(result.image),
                title_align="left",
                subtitle=subtitle,
                subtitle_align="right",
                border_style="cyan",
            )
            target = self._progress.console if self._progress is not None else console
            target.print(panel)
        elif self.total == 1:
            sys.stdout.write(result.text + "\n")
        else:
            sys.stdout.write(f"==> {result.image} <==\n{result.text}\n\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------


def visible_answer(text: str) -> str:
    """What to show of a partial answer: the text before ``###``, without leading or trailing space
    and without trailing ``#`` that may be the start of it (the final answer is stripped too)."""
    head = text.split(STOP_STRING)[0]
    return (head if STOP_STRING in text else head.rstrip("#")).strip()


class StreamView:
    """Receives an answer's growing text and shows it: live markdown on a TTY, plain stdout otherwise."""

    def __init__(self, rich_output: bool) -> None:
        self.rich_output = rich_output
        self.shown = ""
        self._live: Live | None = None

    def start(self) -> None:
        if self.rich_output:
            self._live = Live(
                Markdown(""),
                console=console,
                refresh_per_second=12,
                transient=False,
                vertical_overflow="visible",
            )
            self._live.start()

    def update(self, text: str) -> None:
        """Show ``text`` (the answer so far); plain mode writes only the new suffix."""
        text = visible_answer(text)
        if self._live is not None:
            self._live.update(Markdown(text))
        elif text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
        self.shown = text

    def finish(self, final: str, note: str | None = None) -> None:
        """Replace the streamed text with the cleaned final answer and end the block."""
        if self._live is not None:
            self._live.update(Markdown(final or "_(empty answer)_"))
            self._live.stop()
            self._live = None
        else:
            tail = final[len(self.shown) :] if final.startswith(self.shown) else ""
            sys.stdout.write(tail + "\n")
            sys.stdout.flush()
        if note:
            warn(note)
