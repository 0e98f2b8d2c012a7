"""``curate.jsonl``: one record per finished image, the run's journal and the source of every output.

Records are appended per batch with flush + fsync, so a killed run loses at most the batch in flight;
a torn last line (killed mid-write) is cut off when the journal is reopened. ``filter_cap.json``,
the image folders and ``report.html`` are all derived from the journal, so they can be rebuilt at any
time (after a resume, a re-fix or a review).

Record fields: ``image_id``, ``source``, ``first`` (raw answer), ``continuation`` (text after Continue,
or null), ``answer`` (both joined), ``continued``, ``tokens`` {first, continue}, ``fixed`` (fixer output),
``fix`` {backend, ok, error, seconds}, ``caption`` (the text that goes into the set), ``verdicts``
[{name, passed, reason}], ``accepted``, ``seconds`` {generate, continue, fix}.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgpt4.errors import DataError

log = logging.getLogger("mgpt4.curate")

JOURNAL = "curate.jsonl"
ACCEPTED_DIR = "image"  # cc_sbu_align layout: image/{image_id}.jpg
REJECTED_DIR = "rejected"


def read_journal(out: Path) -> list[dict[str, Any]]:
    """All complete records of ``out/curate.jsonl`` (a torn last line is removed from the file).

    Raises:
        DataError: a line in the middle of the file is not JSON.
    """
    path = out / JOURNAL
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        # Killed mid-write: drop the partial record so the next append starts on a fresh line.
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
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str):
            raise DataError(f"{path}:{number}: not a curate record (no image_id); fix or delete the line")
        records.append(record)
    return records


def append_records(out: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records and make them durable before returning (flush + fsync)."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(out / JOURNAL, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_journal(out: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the journal atomically (temp file + rename), e.g. after a review or a re-fix."""
    path = out / JOURNAL
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def latest_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record per image id, in first-seen order."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["image_id"]] = record
    return latest


def image_path(out: Path, image_id: str, accepted: bool) -> Path:
    return out / (ACCEPTED_DIR if accepted else REJECTED_DIR) / f"{image_id}.jpg"


def store_image(out: Path, image_id: str, accepted: bool, jpeg: bytes) -> None:
    """Write the image where its verdict puts it (temp name, then rename)."""
    path = image_path(out, image_id, accepted)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(jpeg)
    tmp.replace(path)


def place_image(out: Path, image_id: str, accepted: bool) -> bool:
    """Move an image between ``image/`` and ``rejected/`` to match its verdict; False if it is missing."""
    target = image_path(out, image_id, accepted)
    if target.is_file():
        return True
    other = image_path(out, image_id, not accepted)
    if not other.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(other), str(target))
    return True


def read_ids(path: str | Path) -> list[str]:
    """Ids one per line (blank lines and ``#`` comments ignored; ``123.jpg`` is read as ``123``).

    Raises:
        DataError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the id list ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        where = f"{exc.reason}, byte {exc.start + 1}"
        raise DataError(f"{path}: the id list is not UTF-8 text ({where})") from exc
    ids = []
    for line in text.splitlines():
        item = line.split("#", 1)[0].strip()
        if item:
            ids.append(item[:-4] if item.lower().endswith(".jpg") else item)
    return ids
