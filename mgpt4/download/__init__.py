"""``mgpt4 download``: URL lists → img2dataset-compatible WebDataset shards, resumable.

    from mgpt4.download import DownloadConfig, run_download
    summary = run_download(load_config(DownloadConfig, None, ["inputs=[urls.parquet]", "output=shards"]))

fetch (HTTP) · resize (JPEG) · decode_budget (memory) · shard_writer (crash-safe files) · shard_download
(one shard, threaded) · worker (one shard, any distributor) · pool (local processes) · ray_distributor
(Ray tasks) · storage (local folder or fsspec URL) · remote_shard (staging and publishing on a store) ·
progress (counts for a callback) · report (a folder's totals, ``merge_report``) · run (planning,
summary) · config (every setting).

The names below load on first use, so that importing one submodule (the CLI reads
``config.DownloadConfig`` to build its options) does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DownloadConfig": "mgpt4.download.config",
    "DownloadStatus": "mgpt4.download.progress",
    "FetchConfig": "mgpt4.download.fetch",
    "ImageConfig": "mgpt4.download.resize",
    "ProgressCallback": "mgpt4.download.progress",
    "ResizeMode": "mgpt4.download.resize",
    "DownloadSummary": "mgpt4.download.report",
    "merge_report": "mgpt4.download.report",
    "run_download": "mgpt4.download.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mgpt4.download' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
