"""``report.html``: a contact sheet of every curated image with its caption and verdict, for review.

The page is one self-contained HTML file beside ``image/`` and ``rejected/`` (thumbnails are relative
links, so 5,000 images stay a small file). Rejected cards name the failing filters. Ticking cards
collects their ids into a box that can be saved as the ``ids.txt`` for ``mgpt4 curate review``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:20px} header p{margin:0;color:#b9c0cf}
.stats{display:flex;gap:12px;flex-wrap:wrap;padding:16px 28px}
.stat{background:#fff;border-radius:8px;padding:10px 16px;box-shadow:0 1px 2px #0001}
.stat b{display:block;font-size:20px} .stat span{color:#667}
.bar{display:flex;gap:10px;align-items:center;padding:0 28px 12px;flex-wrap:wrap}
.bar button{border:1px solid #ccd;background:#fff;border-radius:16px;padding:5px 14px;cursor:pointer}
.bar button.on{background:#1d2330;color:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px;padding:0 28px 28px}
.card{background:#fff;border-radius:8px;overflow:hidden;box-shadow:0 1px 3px #0002;
border-top:4px solid #2e9d5b}
.card.rejected{border-top-color:#d2453b;opacity:.82}
.card img{width:100%;height:190px;object-fit:cover;background:#ddd;display:block}
.body{padding:10px 12px}
.id{font:12px ui-monospace,monospace;color:#667;display:flex;justify-content:space-between}
.cap{margin:6px 0;white-space:pre-wrap}
.why{color:#b3261e;font-size:12px;margin:4px 0}
.tag{font-size:11px;border-radius:10px;padding:1px 8px;background:#e8f5ed;color:#1f7a44}
.rejected .tag{background:#fbe9e7;color:#b3261e}
details{font-size:12px;color:#556} details pre{white-space:pre-wrap;margin:4px 0}
textarea{width:100%;height:70px;font:12px ui-monospace,monospace}
.review{padding:0 28px 16px}
table{border-collapse:collapse;background:#fff;border-radius:8px;margin:0 28px 16px}
td,th{padding:5px 14px;text-align:left;border-bottom:1px solid #eee}
"""

_JS = """
function show(kind,btn){document.querySelectorAll('.bar button').forEach(b=>b.classList.remove('on'));
btn.classList.add('on');document.querySelectorAll('.card').forEach(c=>{
c.style.display=(kind==='all'||c.classList.contains(kind))?'':'none'})}
function collect(){const ids=[...document.querySelectorAll('.pick:checked')].map(b=>b.value);
document.getElementById('ids').value=ids.join('\\n')}
"""


def render_report(
    rows: Sequence[dict[str, Any]], summary: dict[str, Any], title: str = "mgpt4 curate"
) -> str:
    """The HTML page for ``rows`` (``curate.jsonl`` records) and the run ``summary``."""
    cards = "\n".join(_card(row) for row in rows)
    stats = [
        ("images", summary.get("images", len(rows))),
        ("accepted", summary.get("accepted", 0)),
        ("rejected", summary.get("rejected", 0)),
        ("continued", summary.get("continued", 0)),
    ]
    stat_html = "".join(f'<div class="stat"><b>{value}</b><span>{name}</span></div>' for name, value in stats)
    by_filter = summary.get("rejected_by", {})
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in by_filter.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<p>{html.escape(str(summary.get("out", "")))} · fixer {html.escape(str(summary.get("fixer", "")))} ·
green = in filter_cap.json, red = rejected</p></header>
<div class="stats">{stat_html}</div>
<table><tr><th>rejected by</th><th>images</th></tr>{table}</table>
<div class="bar"><button class="on" onclick="show('all',this)">all</button>
<button onclick="show('accepted',this)">accepted</button>
<button onclick="show('rejected',this)">rejected</button></div>
<div class="review">Tick images to reject, then save these ids as <code>ids.txt</code> and run
<code>mgpt4 curate review --out {html.escape(str(summary.get("out", "OUT")))} --reject ids.txt</code>
<textarea id="ids" readonly placeholder="ticked ids appear here"></textarea></div>
<div class="grid">
{cards}
</div><script>{_JS}</script></body></html>
"""


def _card(row: dict[str, Any]) -> str:
    image_id = html.escape(str(row["image_id"]))
    accepted = bool(row.get("accepted"))
    kind = "accepted" if accepted else "rejected"
    folder = "image" if accepted else "rejected"
    failed = [v for v in row.get("verdicts", []) if not v["passed"]]
    why = "".join(
        f'<div class="why">✗ {html.escape(v["name"])}: {html.escape(v["reason"])}</div>' for v in failed
    )
    caption = html.escape(row.get("caption") or "")
    raw = html.escape(row.get("answer") or "")
    pick = f'<input type="checkbox" class="pick" value="{image_id}" onchange="collect()">' if accepted else ""
    return (
        f'<div class="card {kind}"><img loading="lazy" src="{folder}/{image_id}.jpg" alt="{image_id}">'
        f'<div class="body"><div class="id"><span>{pick} {image_id}</span>'
        f'<span class="tag">{kind}</span></div>'
        f'<div class="cap">{caption}</div>{why}'
        f"<details><summary>generated text ({row.get('tokens', {}).get('first', 0)}"
        f"{' + ' + str(row['tokens'].get('continue', 0)) + ' after Continue' if row.get('continued') else ''}"
        f" tokens)</summary><pre>{raw}</pre></details></div></div>"
    )


def write_report(path: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Write ``report.html`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(rows, summary), encoding="utf-8")
    tmp.replace(path)
    return path
