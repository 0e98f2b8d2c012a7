"""What ``mgpt4 describe`` and ``mgpt4 chat`` run: load the model, drive the library, show the results.

This is the presentation layer (it owns stdin/stdout); the logic lives in ``describe.py`` and
``chat.py``, which never print.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

from mgpt4.console import console, setup_logging
from mgpt4.errors import DataError
from mgpt4.infer.chat import ChatConfig, ChatSession, Reply
from mgpt4.infer.describe import DescribeConfig, collect_inputs, count_images, describe_images
from mgpt4.infer.loading import load_model
from mgpt4.infer.render import DescribeOutput, StreamView, warn
from mgpt4.output_paths import check_writable

log = logging.getLogger("mgpt4.infer")


def run_describe(cfg: DescribeConfig) -> int:
    """Describe ``cfg.inputs`` and show each result as it is ready; returns how many were described.

    Raises:
        UsageError: no inputs, bad model source; DataError (exit 1): some inputs could not be read.
    """
    setup_logging(cfg.quiet)  # logs go to stderr: --json keeps stdout clean either way
    inputs = collect_inputs(cfg.inputs)
    if cfg.output:
        check_writable(cfg.output, "--output")  # before the model loads, not after the work
    model = load_model(cfg.model, cfg.checkpoint, cfg.device)
    total = count_images(inputs)
    with DescribeOutput(cfg.json, cfg.output, cfg.quiet, total) as out:
        for result in describe_images(model, cfg, inputs):
            out.add(result)
            if not out.has_progress_bar and (out.done % cfg.batch_size == 0 or out.done == total):
                log.info("described %d/%s", out.done, total or "?")  # plain progress when not on a TTY
    described = out.done - out.failed
    if cfg.output:
        log.info("wrote %d record(s) to %s", described, cfg.output)
    if out.failed:
        raise DataError(
            f"{out.failed} of {out.done} input(s) could not be read (listed above); {described} described"
        )
    return described


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------


def run_chat(cfg: ChatConfig) -> int:
    """Chat in the terminal, or answer piped stdin lines one per turn; returns the number of failed lines.

    Interactive when stdin and stdout are terminals: rich markdown streaming, commands echo to
    stdout, Ctrl-C stops an answer. Piped: answers (or ``--json`` lines) on stdout, everything else
    on stderr, so scripts can read the answers directly.
    """
    interactive = sys.stdin.isatty() and console.is_terminal and not cfg.json
    setup_logging(quiet=not interactive)
    model = load_model(cfg.model, cfg.checkpoint, cfg.device)
    session = ChatSession(model, cfg.generate)
    for warning in session.load(cfg.load) if cfg.load else []:
        warn(f"warning: {warning}")
    first = session.handle(f"/image {cfg.image}") if cfg.image else Reply("message")
    if first.kind == "error":
        warn(f"error: {first.text}")  # the session goes on without an image
    if interactive:
        _banner(session, cfg)
        return _interactive_loop(session, cfg)
    # Bytes, decoded line by line: a byte that is not valid text fails the question holding it (the
    # session refuses it), while a /image path with such bytes still names its file, as on Linux.
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    return _piped_loop(session, cfg, stdin, failed=int(first.kind == "error"), encoding=sys.stdin.encoding)


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
