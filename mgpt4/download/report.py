"""What an output folder holds, read from its shards' files: ``read_stats`` and ``merge_report``.

``merge_report`` is ``mgpt4 download report -o OUT``: after several machines each downloaded their
share (``--node-rank R --num-nodes N``), it sums every complete shard's ``_stats.json`` into the same
summary a run returns, with the time from the first shard's start to the last one's end, and says
which shards are still incomplete or not started.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from typing import Any

from mgpt4.download.shard_writer import shard_name
from mgpt4.download.storage import LocalFolder, RemoteFolder, open_output
from mgpt4.errors import UsageError

SHARD_FILE = re.compile(
    r"^\d{5,}(\.tar|\.tar\.partial|\.tar\.salvage|_journal\.jsonl|\.parquet|_stats\.json)$"
)
_STATS_FILE = re.compile(r"^(\d{5,})_stats\.json$")
_UNFINISHED_FILE = re.compile(r"^(\d{5,})(\.tar\.partial|\.tar\.salvage|_journal\.jsonl)$")


@dataclasses.dataclass
class DownloadSummary:
    """What ``run_download`` did, or (``scope="folder"``) what a whole output folder holds.

    ``run``: rows, successes, failed_to_download, failed_to_resize, success_rate, seconds, images_per_s,
    error_kinds (count per reason) and examples (one message per reason); ``shards``: written, skipped,
    incomplete (and for a folder, missing: not started); ``dataset``: the folder's complete shards, rows
    and successes.
    """

    output: str
    run: dict[str, Any]
    shards: dict[str, Any]
    dataset: dict[str, Any]
    scope: str | None = None  # "folder" for ``merge_report``

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        head = {"output": self.output} | ({"scope": self.scope} if self.scope else {})
        return head | {"run": self.run, "shards": self.shards, "dataset": self.dataset}


def read_stats(
    folder: LocalFolder | RemoteFolder, names: set[str] | None = None
) -> dict[int, dict[str, Any]]:
    """The stats of every complete shard by shard id: its ``_stats.json`` (written last) parses and its
    tar exists."""
    names = folder.names() if names is None else names
    wanted = {}
    for name in names:
        match = _STATS_FILE.match(name)
        if match and f"{match[1]}.tar" in names:
            wanted[name] = int(match[1])
    out = {}
    for name, text in folder.read_texts(sorted(wanted)).items():
        try:
            stats = json.loads(text)
        except ValueError:
            continue  # torn or foreign: the shard counts as incomplete
        if isinstance(stats, dict) and isinstance(stats.get("count"), int):
            out[wanted[name]] = stats
    return out


def merge_report(output: str) -> DownloadSummary:
    """The summary of a whole output folder, from every complete shard's statistics.

    Same keys as ``run_download``'s summary, with ``scope: folder``; ``run.seconds`` spans the first
    shard's start to the last shard's end, and ``shards`` counts complete, incomplete (partial files
    left) and, when the input row count is cheap to know, not-started shards.

    Raises:
        UsageError: no such folder, or no shard files in it.
    """
    folder = open_output(output)
    names = folder.names()
    if not any(SHARD_FILE.match(n) for n in names):
        raise UsageError(f"{output}: no shards here; give the folder `mgpt4 download -o` wrote")
    stats = read_stats(folder, names)
    totals: Counter = Counter()
    kinds: Counter = Counter()
    for s in stats.values():
        totals.update(
            {k: int(s.get(k, 0)) for k in ("count", "successes", "failed_to_download", "failed_to_resize")}
        )
        kinds.update(s.get("error_kinds") or {})
    starts = [float(s["start_time"]) for s in stats.values() if "start_time" in s]
    ends = [float(s["end_time"]) for s in stats.values() if "end_time" in s]
    seconds = max(ends) - min(starts) if starts and ends else 0.0
    incomplete = {int(m[1]) for n in names if (m := _UNFINISHED_FILE.match(n))} - set(stats)
    rows = totals["count"]
    return DownloadSummary(
        output=folder.location,
        scope="folder",
        run={
            "rows": rows,
            "successes": totals["successes"],
            "failed_to_download": totals["failed_to_download"],
            "failed_to_resize": totals["failed_to_resize"],
            "success_rate": totals["successes"] / rows if rows else 0.0,
            "seconds": seconds,
            "images_per_s": totals["successes"] / seconds if seconds > 0 else 0.0,
            "error_kinds": dict(kinds.most_common()),
            "examples": _examples(folder, stats, set(kinds)),
        },
        shards={
            "written": len(stats),
            "skipped": 0,
            "incomplete": len(incomplete),
            "missing": _not_started(folder, names, len(stats) + len(incomplete)),
        },
        dataset={"shards": len(stats), "rows": rows, "successes": totals["successes"]},
    )


def _examples(folder: LocalFolder | RemoteFolder, stats: dict[int, dict[str, Any]], kinds: set[str]) -> dict:
    """One error message per failure kind, from the parquets of shards that have that kind."""
    examples: dict[str, str] = {}
    for shard_id, s in sorted(stats.items()):
        if kinds <= set(examples):
            break
        if not set(s.get("error_kinds") or {}) - set(examples):
            continue
        try:
            rows = folder.read_parquet(
                f"{shard_name(shard_id)}.parquet", columns=["error_kind", "error_message"]
            )
        except (OSError, ValueError):
            continue
        for row in rows:
            if row["error_kind"] and row["error_message"]:
                examples.setdefault(row["error_kind"], row["error_message"])
    return examples


def _not_started(folder: LocalFolder | RemoteFolder, names: set[str], seen: int) -> int | None:
    """Shards the inputs make that have no file yet, when the saved config's inputs count cheaply."""
    from mgpt4.config import load_config
    from mgpt4.data import sources
    from mgpt4.download.config import DownloadConfig
    from mgpt4.download.run import CONFIG_FILE

    if CONFIG_FILE not in names:
        return None
    try:
        with folder.local_copy(CONFIG_FILE) as local:
            cfg = load_config(DownloadConfig, local)
        counts = [sources.count_rows(p) for p in cfg.inputs]
    except Exception:  # an input moved or unreadable: the count is a courtesy, not the report
        return None
    if any(c is None for c in counts):
        return None
    return max(math.ceil(sum(counts) / cfg.shard_size) - seen, 0)
