"""``mgpt4 chat`` in the terminal: the interactive loop (live markdown) and the piped loop (scripts).

The conversation itself is the library's ``ChatSession`` (``mgpt4.infer.chat``); this module only reads
lines and shows what each returns. Interactive when stdin and stdout are terminals; piped otherwise,
with answers (or ``--json`` lines) on stdout and everything else on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from rich.live import Live
from rich.markdown import Markdown

from mgpt4.cli.console import console, setup_logging, warn
from mgpt4.conversation import STOP_STRING
from mgpt4.errors import DataError
from mgpt4.infer.chat import ChatSession, Reply, start_chat
from mgpt4.infer.config import ChatConfig


def run_chat(cfg: ChatConfig) -> int:
    """Chat in the terminal, or answer piped stdin lines one per turn; returns the number of failed lines.

    Interactive when stdin and stdout are terminals: rich markdown streaming, commands echo to
    stdout, Ctrl-C stops an answer. Piped: answers (or ``--json`` lines) on stdout, everything else
    on stderr, so scripts can read the answers directly.
    """
    interactive = sys.stdin.isatty() and console.is_terminal and not cfg.json
    setup_logging(quiet=not interactive)
    start = start_chat(cfg)
    session = start.session
    for warning in start.warnings:
        warn(f"warning: {warning}")
    if start.image_error:
        warn(f"error: {start.image_error}")  # the session goes on without an image
    if interactive:
        _banner(session, cfg)
        return _interactive_loop(session, cfg)
    # Bytes, decoded line by line: a byte that is not valid text fails the question holding it (the
    # session refuses it), while a /image path with such bytes still names its file, as on Linux.
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    failed = int(start.image_error is not None)
    return _piped_loop(session, cfg, stdin, failed=failed, encoding=sys.stdin.encoding)


def _banner(session: ChatSession, cfg: ChatConfig) -> None:
    source = cfg.checkpoint or f"preset {cfg.model.preset}"
    image = session.pending_image or "no image yet (/image PATH)"
    console.print(f"[bold]mgpt4 chat[/] · {source} · {image}", highlight=False, markup=True)
    if session.turns:
        console.print(f"[dim]resumed {len(session.turns)} turn(s) from {cfg.load}[/]", markup=True)
    console.print("[dim]/help for commands · Ctrl-C stops an answer · /exit or Ctrl-D leaves[/]", markup=True)


def _interactive_loop(session: ChatSession, cfg: ChatConfig) -> int:
    while True:
        try:
            line = console.input("[bold green]you[/] › ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C clears the line; /exit or Ctrl-D leaves)[/]", markup=True)
            continue
        except UnicodeDecodeError as exc:
            warn(f"error: that line is not {exc.encoding} text ({exc.reason}); type it again")
            continue
        if _is_question(line):
            view = StreamView(rich_output=True)
            view.start()
            try:
                reply = session.handle(line, view.update if cfg.stream else None)
            except KeyboardInterrupt:
                reply = Reply("error", "stopped")
            view.finish(reply.text if reply.kind == "answer" else "", reply.note)
            if reply.kind == "answer":
                console.print(f"[dim]{reply.tokens} tokens · {reply.seconds:.1f} s[/]", markup=True)
            else:
                warn(f"error: {reply.text}")
            continue
        reply = session.handle(line)
        if reply.kind == "exit":
            return 0
        if reply.kind == "message":
            console.print(reply.text, markup=False, highlight=False)
        else:
            warn(f"{reply.kind}: {reply.text}" if reply.kind == "error" else reply.text)


def _piped_loop(
    session: ChatSession,
    cfg: ChatConfig,
    lines: Iterable[str | bytes],
    failed: int = 0,
    encoding: str | None = None,
) -> int:
    for raw in lines:
        line = raw.decode(encoding or "utf-8", errors="surrogateescape") if isinstance(raw, bytes) else raw
        if _is_question(line) and not cfg.json:
            view = StreamView(rich_output=False)
            reply = session.handle(line, view.update if cfg.stream else None)
            if reply.kind == "answer":
                view.finish(reply.text, reply.note)
                continue
        else:
            reply = session.handle(line)
        if reply.kind == "exit":
            break
        if reply.kind == "answer":
            record = {
                "question": line.strip(),
                "answer": reply.text,
                "tokens": reply.tokens,
                "seconds": round(reply.seconds, 4),
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if reply.note:
                warn(reply.note)
        elif reply.kind == "error":
            failed += 1
            warn(f"error: {reply.text}")
        else:
            warn(reply.text)
    if failed:
        raise DataError(f"{failed} input line(s) failed (listed above)")
    return failed


def _is_question(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith("/")


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
