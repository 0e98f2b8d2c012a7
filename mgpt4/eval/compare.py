"""``compare``: two eval runs side by side, metric by metric, as data for the CLI to render.

table = compare("evals/stage1", "evals/stage2")
for row in table.rows: print(row.metric, row.a, row.b, row.difference)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mgpt4.errors import UsageError

SCORES = "scores.json"


@dataclasses.dataclass
class MetricRow:
    """One metric in both runs; ``difference`` is b − a (None when either is missing)."""

    metric: str
    a: float | None
    b: float | None
    difference: float | None


@dataclasses.dataclass
class Comparison:
    """The table, the two runs' folders and tasks, and notes on what makes them hard to compare."""

    a: str
    b: str
    task_a: str
    task_b: str
    rows: list[MetricRow]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare(dir_a: str | Path, dir_b: str | Path) -> Comparison:
    """Per metric: a, b and b − a, in a's metric order (then b's extra metrics).

    Nested metrics (the judge's histogram) become dotted names (``histogram.7``). Notes say when the
    runs differ in task, data, prompt or decoding, which makes the difference mean less.

    Raises:
        UsageError: a folder has no readable scores.json.
    """
    first, second = _read_scores(Path(dir_a)), _read_scores(Path(dir_b))
    metrics_a, metrics_b = _flatten(first.get("metrics", {})), _flatten(second.get("metrics", {}))
    rows = []
    for name in [*metrics_a, *(m for m in metrics_b if m not in metrics_a)]:
        a, b = metrics_a.get(name), metrics_b.get(name)
        difference = b - a if a is not None and b is not None else None
        rows.append(MetricRow(name, a, b, difference))
    return Comparison(
        str(dir_a), str(dir_b), first.get("task", "?"), second.get("task", "?"), rows, _notes(first, second)
    )


def _read_scores(folder: Path) -> dict[str, Any]:
    path = folder / SCORES
    if not path.is_file():
        raise UsageError(f"{path}: not found; run `mgpt4 eval` with out={folder} first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a readable scores.json ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a scores.json (expected an object)")
    return data


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    flat: dict[str, float | None] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            flat[f"{prefix}{name}"] = value
    return flat


def _notes(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    notes = []
    if first.get("task") != second.get("task"):
        notes.append(f"different tasks: {first.get('task')} vs {second.get('task')}")
    data_a, data_b = first.get("data", {}), second.get("data", {})
    if (data_a.get("sha256"), data_a.get("listing_sha256")) != (
        data_b.get("sha256"),
        data_b.get("listing_sha256"),
    ):
        notes.append("different data (fingerprints differ)")
    elif first.get("items") != second.get("items"):
        notes.append(f"different numbers of items: {first.get('items')} vs {second.get('items')}")
    settings_a, settings_b = first.get("settings", {}), second.get("settings", {})
    changed = [k for k in ("prompt", "prompt_style", "generate") if settings_a.get(k) != settings_b.get(k)]
    if changed:
        notes.append(f"different {', '.join(changed)}")
    return notes
