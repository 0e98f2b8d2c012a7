"""Tiny training data on disk: shape-image shard sets (stage 1) and aligned folders (stage 2)."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from mgpt4.data.aligned import write_aligned
from mgpt4.data.synthetic import make_samples


def write_shape_shards(folder: Path, count: int, per_shard: int = 16, seed: int = 0) -> Path:
    """img2dataset-style shards of the built-in shapes: KEY.jpg, KEY.txt, KEY.json + NNNNN_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_samples(count, seed=seed)
    for shard_id, start in enumerate(range(0, count, per_shard)):
        chunk = samples[start : start + per_shard]
        with wds.TarWriter(str(folder / f"{shard_id:05d}.tar")) as sink:
            for offset, sample in enumerate(chunk):
                key = f"{start + offset:09d}"
                meta = {"key": key, "caption": sample.caption, "status": "success"}
                sink.write({"__key__": key, "jpg": sample.image, "txt": sample.caption, "json": meta})
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(chunk)}))
    return folder


def write_shape_aligned(folder: Path, count: int, seed: int = 1) -> Path:
    """A cc_sbu_align-format folder of shapes with their detailed descriptions."""
    samples = make_samples(count, seed=seed)
    write_aligned(folder, [(s.key, s.image, s.detailed) for s in samples])
    return folder
