"""Count what an output folder holds, checking that tar, parquet and stats agree shard by shard.

Reads through fsspec, so the same check runs on a local folder, ``file://``, ``memory://`` or ``s3://``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq


@dataclass
class FolderCounts:
    rows: int = 0
    successes: int = 0
    keys: list[str] = field(default_factory=list)  # every parquet key, in shard order
    jpegs: dict[str, bytes] = field(default_factory=dict)  # tar member name → bytes
    shards: int = 0
    leftovers: list[str] = field(default_factory=list)  # partial, journal, salvage and temporary files


def count_folder(location: str) -> FolderCounts:
    """Every complete shard of ``location``, each checked: no key twice in its tar or parquet, every
    success's jpg/txt/json in the tar and nothing else, stats counts equal to the parquet's."""
    fs, root = fsspec.core.url_to_fs(location)
    fs.invalidate_cache()
    names = sorted(str(p).rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    out = FolderCounts()
    for name in names:
        if not name.endswith("_stats.json"):
            if any(mark in name for mark in (".partial", ".salvage", "_journal", ".tmp")):
                out.leftovers.append(name)
            continue
        shard = name.removesuffix("_stats.json")
        stats = json.loads(fs.cat_file(f"{root}/{name}"))
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/{shard}.tar"))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            dupes = [n for n, c in Counter(m.name for m in tar.getmembers()).items() if c > 1]
        assert not dupes, f"{shard}.tar: members twice: {dupes[:5]}"
        records = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{shard}.parquet"))).to_pylist()
        keys = [r["key"] for r in records]
        assert len(keys) == len(set(keys)), f"{shard}.parquet: a key twice"
        ok = {r["key"] for r in records if r["status"] == "success"}
        assert set(members) == {f"{k}.{ext}" for k in ok for ext in ("jpg", "txt", "json")}, shard
        assert stats["count"] == len(records) and stats["successes"] == len(ok), shard
        out.rows += len(records)
        out.successes += len(ok)
        out.keys += keys
        out.jpegs.update({n: b for n, b in members.items() if n.endswith(".jpg")})
        out.shards += 1
    return out
