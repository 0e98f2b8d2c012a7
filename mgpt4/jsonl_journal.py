"""Append-only JSON-lines journals that survive a kill: curate's ``curate.jsonl``, eval's ``answers.jsonl``.

Writers append whole lines and flush, so a SIGKILL can only tear the last line; readers cut that torn
line off the file (so the next append starts on a fresh line) and refuse anything else that is not a
record, naming the file and line. Rewrites go to a temporary name, are fsynced and renamed over the old
file, so a reader sees the old journal or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgpt4.errors import DataError

log = logging.getLogger("mgpt4.journal")


def read_records(path: Path, key: str, kind: str) -> list[dict[str, Any]]:
    """Every complete record of ``path`` (none if it does not exist); a torn last line is cut off the file.

    Args:
        key: the field every record must hold as a string (its id).
        kind: what a record is, for the error message ("a curate record").

    Raises:
        DataError: a line before the last is not a JSON object with a string ``key``.
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
            record = json.loads(line)  # bytes: json detects UTF-8 and reports bad bytes as a ValueError
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{path}:{number}: not a JSON record ({reason}); fix or delete the line") from exc
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise DataError(f"{path}:{number}: not {kind} (no {key}); fix or delete the line")
        records.append(record)
    return records


def rewrite_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the journal atomically: temporary file, fsync, rename."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
