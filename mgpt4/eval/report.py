"""``report.html``: every answer of an eval run beside its image, reference and scores, worst first.

One self-contained page next to ``answers.jsonl``. Images are relative links (to the data's own files,
or to ``thumbs/`` for images that came out of shards), so a large run stays a small file. Cards are
ordered by the task's main per-item score, lowest first, unreadable images at the very top.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px} header h1{margin:0 0 6px;font-size:20px}
header p{margin:0;color:#b9c0cf}
table{border-collapse:collapse;background:#fff;margin:16px 28px;border-radius:8px}
td,th{padding:5px 14px;text-align:left;border-bottom:1px solid #eee}
.notes{margin:0 28px 12px;color:#8a5300}
.card{display:flex;gap:14px;background:#fff;border-radius:8px;margin:0 28px 12px;padding:12px;
box-shadow:0 1px 3px #0002;border-left:5px solid #2e9d5b}
.card.low{border-left-color:#d2453b} .card.mid{border-left-color:#e0a100}
.card img{width:160px;height:160px;object-fit:contain;background:#ddd;flex:none}
.id{font:12px ui-monospace,monospace;color:#667} .q{font-weight:600;margin:4px 0}
.a{white-space:pre-wrap;margin:4px 0} .ref{color:#556;white-space:pre-wrap;font-size:13px}
.s{font:12px ui-monospace,monospace;color:#334;margin-top:6px} .err{color:#b3261e}
"""


def render_report(records: Sequence[dict[str, Any]], summary: dict[str, Any], primary: str, out: Path) -> str:
    """The HTML page for the scored ``records`` of a run and its ``summary`` (scores.json)."""
    ordered = sorted(records, key=lambda r: _sort_key(r, primary))
    metrics = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_number(value)}</td></tr>"
        for name, value in summary.get("metrics", {}).items()
        if not isinstance(value, dict)
    )
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in summary.get("notes", []))
    model = html.escape(json_line(summary.get("model", {})))
    root = out.resolve()
    cards = "\n".join(_card(r, primary, root) for r in ordered)
    title = f"mgpt4 eval {summary.get('task', '')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1><p>{model} · {summary.get("items", 0)} items ·
mgpt4 {html.escape(str(summary.get("mgpt4_version", "")))} · worst {html.escape(primary)} first</p></header>
<table><tr><th>metric</th><th>value</th></tr>{metrics}</table>
<div class="notes">{notes}</div>
{cards}
</body></html>
"""


def json_line(value: dict[str, Any]) -> str:
    """A dict as ``key=value`` pairs (nested values flattened with dots) for a header line."""
    parts = []
    for key, item in value.items():
        if isinstance(item, dict):
            parts += [f"{key}.{k}={v}" for k, v in item.items() if v not in (None, [], {})]
        else:
            parts.append(f"{key}={item}")
    return " ".join(parts)


def _sort_key(record: dict[str, Any], primary: str) -> tuple[int, float]:
    value = (record.get("scores") or {}).get(primary)
    return (0, 0.0) if value is None else (1, float(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _image_src(record: dict[str, Any], out: Path) -> str | None:
    """A link to the item's image relative to the (resolved) output folder, or its thumbnail."""
    if record.get("thumb"):
        return record["thumb"]
    image = Path(record["image"])
    if not image.is_absolute() or "#" in record["image"]:
        return None
    relative = os.path.relpath(image, out)
    return urllib.parse.quote(relative.replace(os.sep, "/"))


def _reference_text(reference: Any) -> str:
    if isinstance(reference, dict):  # shapes
        return str(reference.get("detailed") or reference.get("caption") or "")
    if isinstance(reference, list):
        return "\n".join(str(r) for r in reference)
    return str(reference)


def _card(record: dict[str, Any], primary: str, out: Path) -> str:
    scores = record.get("scores") or {}
    value = scores.get(primary)
    level = "low" if value is None or float(value) < 0.34 * _scale(primary) else ""
    if value is not None and not level and float(value) < 0.67 * _scale(primary):
        level = "mid"
    src = _image_src(record, out)
    image = f'<img loading="lazy" src="{html.escape(src)}" alt="">' if src else "<img alt=''>"
    shown = {k: v for k, v in scores.items() if not isinstance(v, dict | list)}
    score_line = " · ".join(f"{html.escape(k)} {_number(v)}" for k, v in shown.items())
    judge = record.get("judge") or {}
    reason = (
        f'<div class="ref">judge: {html.escape(judge.get("reason") or "")}</div>'
        if judge.get("reason")
        else ""
    )
    error = f'<div class="err">✗ {html.escape(record["error"])}</div>' if record.get("error") else ""
    judge_error = f'<div class="err">judge: {html.escape(judge["error"])}</div>' if judge.get("error") else ""
    return (
        f'<div class="card {level}">{image}<div><div class="id">{html.escape(str(record["id"]))} · '
        f"{html.escape(record['image'])}</div>"
        f'<div class="q">{html.escape(record.get("question") or "")}</div>'
        f'<div class="a">{html.escape(record.get("answer") or "")}</div>'
        f'<div class="ref">reference: {html.escape(_reference_text(record.get("reference")))}</div>'
        f'{reason}{error}{judge_error}<div class="s">{score_line}</div></div></div>'
    )


def _scale(primary: str) -> float:
    """The top of the main score's range: ratings go to 10, CIDEr-D to 10, the rest to 1."""
    return 10.0 if primary in ("rating", "cider_d") else 1.0


def write_report(
    path: str | Path, records: Sequence[dict[str, Any]], summary: dict[str, Any], primary: str
) -> Path:
    """Write ``report.html`` atomically (temporary name, then rename)."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(render_report(records, summary, primary, path.parent), encoding="utf-8")
    partial.replace(path)
    return path
