"""``answers.jsonl``: appended per batch while a run answers, read back on resume, rewritten when scored.

Curate's journal works the same way (``curate/records.py``); this one is keyed by ``id`` and fsyncs
less often (see ``AnswerJournal``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgpt4.errors import DataError

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
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an incomplete last record (%d bytes)", path, len(data) - cut)
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not a JSON record; fix or delete the line") from exc
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise DataError(f"{path}:{number}: not an eval answer (no id); fix or delete the line")
        records.append(record)
    return records


def rewrite_answers(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``answers.jsonl`` atomically (temporary file, fsync, rename)."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
