"""Small helpers for the eval tests: short decoding, reading answers.jsonl, writing JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

from mgpt4.config import GenerateConfig

SHORT = GenerateConfig(max_new_tokens=8)


def read_answers(out: Path) -> list[dict]:
    """Every record of ``out/answers.jsonl``, in file order."""
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def write_lines(path: Path, rows: list) -> Path:
    """A JSON-lines file: dicts are dumped, strings written as they are (to plant broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
