"""``DownloadConfig``: every setting of ``mgpt4 download``, one typed dataclass (saved beside the shards)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mgpt4.config import field
from mgpt4.download.fetch import FetchConfig
from mgpt4.download.resize import ImageConfig
from mgpt4.errors import ConfigError


@dataclasses.dataclass
class DownloadConfig:
    """``mgpt4 download``: inputs, output folder, columns, parallelism, image and fetch settings."""

    inputs: list[str] = field(
        default_factory=list, doc="URL list files (json/jsonl/csv/tsv/parquet/txt, .gz ok)"
    )
    output: str = field(
        "shards", doc="output folder or fsspec URL (s3://…) for NNNNN.tar / _stats.json / .parquet"
    )
    url_col: str | None = field(None, doc="URL column (default: the preset's, else url/URL)")
    caption_col: str | None = field(
        None, doc="caption column (default: the preset's, else caption/TEXT/text)"
    )
    preset: Literal["laion", "cc_sbu"] | None = field(
        None, doc="known column names: laion (URL/TEXT), cc_sbu"
    )
    shard_size: int = field(10000, doc="input rows per shard")
    processes: int = field(0, doc="worker processes (0 = one per CPU core)")
    threads: int = field(32, doc="threads per process, each fetching and resizing one image at a time")
    decode_memory_mb: int = field(
        512,
        doc="decoded-image memory per process in MiB: threads wait for room before decoding, "
        "an image needing more decodes alone (README: memory bound)",
    )
    retry_failed: bool = field(
        False, doc="re-fetch rows of complete shards that failed for transient reasons"
    )
    distributor: Literal["multiprocessing", "ray"] = field(
        "multiprocessing",
        doc="who runs the shards: local worker processes, or Ray tasks (pip install 'mgpt4[ray]')",
    )
    ray_address: str | None = field(
        None, doc="Ray cluster to join (auto, or HOST:PORT); None starts a local one with `processes` CPUs"
    )
    node_rank: int = field(0, doc="this machine's index (0 … num_nodes-1) when several share one list")
    num_nodes: int = field(
        1, doc="machines sharing the list without Ray; each takes every num_nodes-th shard"
    )
    checkpoint_seconds: float = field(
        60.0,
        doc="remote output: seconds between uploads of an unfinished shard (what a kill can cost; each "
        "upload sends its partial tar whole, as a store cannot append)",
    )
    image: ImageConfig = field(default_factory=ImageConfig, doc="stored image settings")
    fetch: FetchConfig = field(default_factory=FetchConfig, doc="HTTP settings")

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid key."""
        positive = {
            "shard_size": self.shard_size,
            "threads": self.threads,
            "decode_memory_mb": self.decode_memory_mb,
            "image.size": self.image.size,
            "fetch.max_per_host": self.fetch.max_per_host,
            "fetch.max_bytes": self.fetch.max_bytes,
            "image.max_pixels": self.image.max_pixels,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")
        checks = [
            ("processes", self.processes >= 0),
            ("image.jpeg_quality", 1 <= self.image.jpeg_quality <= 100),
            ("image.min_size", self.image.min_size >= 0),
            ("fetch.timeout", self.fetch.timeout > 0),
            ("fetch.max_redirects", self.fetch.max_redirects >= 0),
            ("fetch.retries", self.fetch.retries >= 0),
            ("fetch.backoff_base", self.fetch.backoff_base >= 0),
            ("checkpoint_seconds", self.checkpoint_seconds > 0),
            ("num_nodes", self.num_nodes >= 1),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{key}: invalid value")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ConfigError(f"node_rank: must be in 0 … {self.num_nodes - 1} (num_nodes={self.num_nodes})")
        if self.output.startswith("memory://") and (
            self.processes != 1 or self.distributor != "multiprocessing"
        ):
            raise ConfigError(
                "output: a memory:// folder lives in one process; use processes=1 with the multiprocessing "
                "distributor"
            )


# Settings that decide what the files in an output folder contain: a rerun must not mix in other values.
IDENTITY_KEYS = ("inputs", "url_col", "caption_col", "preset", "shard_size", "image")
