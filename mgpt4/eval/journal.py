"""``answers.jsonl`` while a run answers: appended per batch, flushed at once, fsync'd now and then."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FSYNC_SECONDS = 5.0


class AnswerJournal:
    """``answers.jsonl`` open for appending during the run.

    Each batch is written and flushed, so a SIGKILL loses nothing already appended (the OS holds it);
    fsync — which only guards against power loss — runs at most every ``FSYNC_SECONDS`` and at the end
    (an fsync per batch cost up to 15 ms on a busy disk, as much as generating a micro-model answer).
    A torn last line is cut off by ``read_journal`` on the next run.
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
