"""``answers.jsonl``: appended per batch while a run answers, read back on resume, rewritten when scored.

Reading and rewriting are ``mgpt4.jsonl_journal``'s, as for curate's journal; records are keyed by ``id``,
and appends fsync less often than curate's (see ``AnswerJournal``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgpt4.jsonl_journal import read_records, rewrite_records

log = logging.getLogger("mgpt4.eval")

FSYNC_SECONDS = 5.0


class AnswerJournal:
    """``answers.jsonl`` open for appending during the run.

    Each batch is written and flushed, so a SIGKILL loses nothing already appended (the OS holds it);
    fsync — which only guards against power loss — runs at most every ``FSYNC_SECONDS`` and at the end
    (an fsync per batch cost up to 15 ms on a busy disk, as much as generating a micro-model answer).
    A torn last line is cut off by ``read_answers`` on the next run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = None
        self.synced = time.monotonic()

    def __enter__(self) -> AnswerJournal:
        return self

    def append(self, rows: list[dict]) -> None:
        if self.handle is None:
            self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.handle.flush()
        if time.monotonic() - self.synced >= FSYNC_SECONDS:
            os.fsync(self.handle.fileno())
            self.synced = time.monotonic()

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Every complete record of ``answers.jsonl``; a torn last line (a kill mid-write) is cut off the file.

    Raises:
        DataError: a line in the middle is not a JSON record with an ``id``.
    """
    return read_records(path, "id", "an eval answer")


def rewrite_answers(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``answers.jsonl`` atomically (temporary file, fsync, rename)."""
    rewrite_records(path, records)
