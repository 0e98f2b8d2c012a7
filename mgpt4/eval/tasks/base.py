"""What every task shares: the item type, the task record, data-file reading and data fingerprints.

A task turns its data into ``EvalItem``s (in a fixed order, ids unique), and turns answered records
into scores. Data files are checked while they are read, before anything is written: a malformed line
is a ``UsageError`` naming the file and the line (exit code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mgpt4.data.images import open_image
from mgpt4.errors import UsageError

if TYPE_CHECKING:
    from mgpt4.eval.config import EvalConfig


@dataclasses.dataclass
class EvalItem:
    """One question about one image.

    ``question`` is the item's own question (None: the task's fixed instruction); ``reference`` is what
    the task scores against (captions, a yes/no label, answers, a reference text, shape attributes);
    ``image_file`` is the image on disk (None when it comes from a shard), used by the report.
    """

    id: str
    image: str
    reference: Any
    question: str | None = None
    open: Callable[[], Image.Image] | None = None
    error: str | None = None
    image_file: str | None = None


@dataclasses.dataclass
class TaskData:
    """A task's items (streamed, in order), how many there are (None: unknown) and a data fingerprint."""

    items: Iterator[EvalItem]
    total: int | None
    fingerprint: dict[str, Any]


@dataclasses.dataclass
class TaskScores:
    """Per-item scores by id, the task's metrics, and notes for the reader (what was skipped, why)."""

    per_item: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Task:
    """A task: how to read its data, what to ask, how to score; ``primary`` orders the report (worst first).

    Judge only: ``annotator(cfg)`` makes the function that adds to a batch of records before they are
    journaled, ``incomplete`` says which journaled records it must redo on a rerun, and ``settings``
    adds what scores.json must record (the rubric).
    """

    name: str
    load: Callable[[EvalConfig], TaskData]
    score: Callable[[list[dict[str, Any]], EvalConfig], TaskScores]
    default_prompt: str | None
    primary: str
    annotator: Callable[[EvalConfig], Callable[[list[dict[str, Any]]], None]] | None = None
    incomplete: Callable[[dict[str, Any]], bool] | None = None
    settings: Callable[[EvalConfig], dict[str, Any]] | None = None


# --------------------------------------------------------------------------------------------------
# reading data files
# --------------------------------------------------------------------------------------------------


def require_file(path: str | None, task: str, what: str) -> Path:
    """``path`` as an existing file (or folder).

    Raises:
        UsageError: no path given, or nothing there.
    """
    if not path:
        raise UsageError(f"eval {task}: give the data ({what})")
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{file}: no such file or folder ({what})")
    return file


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file.

    Raises:
        UsageError: a line is not a JSON object (names the file and line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line"
            ) from exc
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def read_json(path: Path) -> Any:
    """A whole JSON file.

    Raises:
        UsageError: not valid JSON (names the file, line and column).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from exc


def text_field(row: dict[str, Any], names: Iterable[str], where: str, required: bool = True) -> str | None:
    """The first of ``names`` present in ``row``, as a string.

    Raises:
        UsageError: none is present (when ``required``), or the value is not text.
    """
    names = list(names)
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise UsageError(f"{where}: '{name}' must be text, got {type(value).__name__}")
            return str(value)
    if required:
        raise UsageError(
            f"{where}: missing '{names[0]}'" + (f" (or {', '.join(names[1:])})" if names[1:] else "")
        )
    return None


def check_unique(item_id: str, seen: set[str], where: str) -> None:
    """Ids name answers in answers.jsonl: a repeated one would mix two items up.

    Raises:
        UsageError: ``item_id`` was seen before.
    """
    if item_id in seen:
        raise UsageError(f"{where}: id {item_id!r} appears twice; ids must be unique")
    seen.add(item_id)


def image_item(item_id: str, root: Path, name: str, **fields: Any) -> EvalItem:
    """An item whose image is the file ``root/name`` (an error item when it is missing)."""
    path = Path(os.path.abspath(root / name))  # absolute: records stay valid from another directory
    if not path.is_file():
        return EvalItem(item_id, str(path), error="no such file", **fields)
    return EvalItem(
        item_id, str(path), open=lambda path=path: open_image(path), image_file=str(path), **fields
    )


def images_root(cfg: EvalConfig, data: Path) -> Path:
    """Where relative image paths point: ``cfg.images``, else the data file's folder."""
    if cfg.images:
        root = Path(cfg.images)
        if not root.is_dir():
            raise UsageError(f"images: {root} is not a folder")
        return root
    return data if data.is_dir() else data.parent


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 of ``name<TAB>size`` lines: cheap identity of a set of images or shards (-1: missing)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        size = path.stat().st_size if path.is_file() else -1
        digest.update(f"{path.name}\t{size}\n".encode())
    return digest.hexdigest()


def fingerprint(
    path: Path, files: Iterable[Path], images: Iterable[str | os.PathLike], items: int | None
) -> dict:
    """The data identity saved in scores.json: file hashes, an image listing hash and the item count."""
    return {
        "path": str(path.resolve()),
        "sha256": {str(f.name): file_sha256(f) for f in files},
        "listing_sha256": listing_sha256(images),
        "items": items,
    }
