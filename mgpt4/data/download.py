"""``mgpt4 download``: URL lists → img2dataset-compatible WebDataset shards, resumable.

    cfg = load_config(DownloadConfig, None, ["inputs=[urls.parquet]", "output=shards", "preset=laion"])
    summary = run_download(cfg)

Input rows are cut into shards of ``shard_size`` in input order, so shard N always holds the same rows
and a rerun of the same command finds its earlier work: complete shards (``NNNNN_stats.json`` present)
are skipped, incomplete ones resume from their partial files (``mgpt4.data.shard_writer``).

Parallelism: ``processes`` worker processes, each downloading one shard at a time with ``threads``
threads that carry a row all the way from request to JPEG (``mgpt4.data.shard_download``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from mgpt4.config import field, load_config, save_config
from mgpt4.data import shard_writer, sources
from mgpt4.data.download_pool import ShardPool, Skipped, WorkerSpec, execute, sigterm_as_interrupt
from mgpt4.data.download_report import DownloadProgress
from mgpt4.data.fetch import TRANSIENT_KINDS, FetchSettings
from mgpt4.data.shard_download import ImageSettings, ShardJob, ShardResult
from mgpt4.errors import ConfigError, DataError, UsageError

log = logging.getLogger("mgpt4.download")

CONFIG_FILE = "download_config.yaml"
_LOCK_FILE = ".download.lock"


@dataclasses.dataclass
class ImageConfig:
    """How each downloaded image is stored."""

    size: int = field(224, doc="target size in pixels (the official recipe downloads at 224)")
    resize_mode: Literal["border", "center_crop", "keep_ratio", "no"] = field(
        "border", doc="border (fit, pad white), center_crop, keep_ratio (short side = size) or no"
    )
    jpeg_quality: int = field(95, doc="JPEG quality of stored images (img2dataset's default 95)")
    min_size: int = field(0, doc="drop images whose shorter side is below this many pixels")
    max_pixels: int = field(89_478_485, doc="drop images with more pixels than this (decompression bombs)")


@dataclasses.dataclass
class FetchConfig:
    """How URLs are fetched."""

    timeout: float = field(10.0, doc="seconds for one request, connect to last byte (per redirect hop)")
    max_redirects: int = field(5, doc="redirects followed per URL")
    max_bytes: int = field(32 << 20, doc="largest body accepted, in bytes")
    retries: int = field(2, doc="retries of a URL answered 429/503, after a per-host backoff")
    backoff_base: float = field(
        1.0, doc="first backoff in seconds when a host says 429/503 without Retry-After"
    )
    backoff_max: float = field(60.0, doc="longest backoff in seconds (caps Retry-After too)")
    max_per_host: int = field(16, doc="requests in flight to one host, per process")
    user_agent: str = field("Mozilla/5.0 (compatible; mgpt4-download/0.1)", doc="User-Agent header")
    respect_noai: bool = field(True, doc="skip images whose X-Robots-Tag says noai/noimageai/noindex")


@dataclasses.dataclass
class DownloadConfig:
    """``mgpt4 download``: inputs, output folder, columns, parallelism, image and fetch settings."""

    inputs: list[str] = field(
        default_factory=list, doc="URL list files (json/jsonl/csv/tsv/parquet/txt, .gz ok)"
    )
    output: str = field("shards", doc="output folder for NNNNN.tar / _stats.json / .parquet")
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
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"{key}: invalid value")

    def fetch_settings(self) -> FetchSettings:
        """The fetch section as the fetcher's settings."""
        return FetchSettings(**dataclasses.asdict(self.fetch))

    def image_settings(self) -> ImageSettings:
        """The image section as the resizer's settings."""
        im = self.image
        return ImageSettings(im.size, im.resize_mode, im.jpeg_quality, im.min_size, im.max_pixels)


# Settings that decide what the files in an output folder contain: a rerun must not mix in other values.
_IDENTITY_KEYS = ("inputs", "url_col", "caption_col", "preset", "shard_size", "image")


def run_download(cfg: DownloadConfig, show_progress: bool = False) -> dict[str, Any]:
    """Download every row of ``cfg.inputs`` into shards under ``cfg.output``; returns a summary dict.

    Raises:
        UsageError: missing/unknown inputs, no URL column, a folder written with other settings or in use.
        DataError: unreadable inputs, unwritable output, a worker process that died.
    """
    paths = sources.check_inputs(cfg.inputs)
    cfg = dataclasses.replace(cfg, inputs=[str(p.resolve()) for p in paths])
    columns = sources.resolve_columns(cfg.url_col, cfg.caption_col, cfg.preset)
    sources.check_columns(paths, columns)
    folder = _output_folder(Path(cfg.output))
    with _folder_lock(folder):
        _check_same_settings(folder, cfg)
        try:
            save_config(cfg, folder / CONFIG_FILE, header=f"mgpt4 download --config {folder / CONFIG_FILE}")
        except OSError as exc:
            raise DataError(f"{folder / CONFIG_FILE}: cannot write ({exc.strerror or exc})") from exc
        counts = [sources.count_rows(p) for p in paths]
        total = sum(counts) if all(c is not None for c in counts) else None
        started = time.monotonic()
        spec = WorkerSpec(
            folder, cfg.fetch_settings(), cfg.image_settings(), cfg.threads, cfg.decode_memory_mb << 20
        )
        pool = ShardPool(spec, cfg.processes or os.cpu_count() or 1)
        with DownloadProgress(total, show_progress) as progress, sigterm_as_interrupt():
            results, shards = execute(_plan(paths, columns, cfg, folder, progress), pool, progress)
        return _summary(cfg, folder, results, shards, time.monotonic() - started)


def _output_folder(folder: Path) -> Path:
    """Create the output folder; a path that cannot be one is the user's to change (UsageError)."""
    hint = "choose another output folder with -o"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: is a file, not a folder; {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{folder}: cannot create the output folder ({exc.strerror or exc}); {hint}"
        ) from exc
    return folder


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        handle = open(folder / _LOCK_FILE, "w")  # noqa: SIM115 - `with handle` below closes it
    except OSError as exc:
        raise UsageError(
            f"{folder}: cannot write to the output folder ({exc.strerror or exc}); "
            "choose another output folder with -o"
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise UsageError(f"{folder}: another `mgpt4 download` is writing to this folder") from exc
        yield


def _check_same_settings(folder: Path, cfg: DownloadConfig) -> None:
    """The saved settings guard the shards written with them; with no shard yet (a run that failed on
    its inputs or columns, or was stopped at once) there is nothing to guard and they are replaced."""
    saved_path = folder / CONFIG_FILE
    if not saved_path.is_file() or not shard_writer.has_shard_files(folder):
        return
    try:
        saved = load_config(DownloadConfig, saved_path)
    except ConfigError as exc:
        raise UsageError(
            f"{saved_path}: unreadable ({exc}); delete it or choose another output folder"
        ) from exc
    for key in _IDENTITY_KEYS:
        old, new = getattr(saved, key), getattr(cfg, key)
        if old != new:
            shown_old = dataclasses.asdict(old) if dataclasses.is_dataclass(old) else old
            shown_new = dataclasses.asdict(new) if dataclasses.is_dataclass(new) else new
            raise UsageError(
                f"{folder} was written with {key}={shown_old}, this run has {key}={shown_new}; "
                "rerun with the same inputs and settings to resume, or choose another output folder"
            )


# --------------------------------------------------------------------------------------------------
# planning: which shards need work
# --------------------------------------------------------------------------------------------------


def _plan(
    paths: list[Path], columns: sources.Columns, cfg: DownloadConfig, folder: Path, progress: DownloadProgress
) -> Iterator[ShardJob | Skipped]:
    rows_iter = sources.iter_rows(paths, columns)
    total = 0
    for shard_id in itertools.count():
        rows = list(itertools.islice(rows_iter, cfg.shard_size))
        if not rows:
            break
        total += len(rows)
        if shard_writer.completed_rows(folder, shard_id) != len(rows):  # new, unfinished, or the list grew
            yield ShardJob(shard_id, rows, cfg.shard_size)
        elif cfg.retry_failed and _has_transient_failures(folder, shard_id):
            yield ShardJob(shard_id, rows, cfg.shard_size, retry_transient=True)
        else:
            yield Skipped(shard_id, len(rows))
    progress.set_total(total)


def _has_transient_failures(folder: Path, shard_id: int) -> bool:
    try:
        records = shard_writer.read_records(folder, shard_id)
    except (OSError, ValueError):
        return False
    return any(r.get("status") != "success" and r.get("error_kind") in TRANSIENT_KINDS for r in records)


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def _summary(
    cfg: DownloadConfig, folder: Path, results: list[ShardResult], shards: Counter, seconds: float
) -> dict[str, Any]:
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    examples: dict[str, str] = {}
    for r in results:
        statuses.update(r.statuses)
        kinds.update(r.error_kinds)
        for kind, message in r.examples.items():
            examples.setdefault(kind, message)
    rows = sum(statuses.values())
    dataset = {"shards": 0, "rows": 0, "successes": 0}
    for stats_file in sorted(folder.glob("*_stats.json")):
        stats = _read_json(stats_file)
        if stats:
            dataset["shards"] += 1
            dataset["rows"] += int(stats.get("count", 0))
            dataset["successes"] += int(stats.get("successes", 0))
    return {
        "output": str(folder),
        "run": {
            "rows": rows,
            "successes": statuses["success"],
            "failed_to_download": statuses["failed_to_download"],
            "failed_to_resize": statuses["failed_to_resize"],
            "success_rate": statuses["success"] / rows if rows else 0.0,
            "seconds": seconds,
            "images_per_s": statuses["success"] / seconds if seconds > 0 else 0.0,
            "error_kinds": dict(kinds.most_common()),
            "examples": examples,
        },
        "shards": {
            "written": shards["written"],
            "skipped": shards["skipped"],
            "incomplete": shards["incomplete"],
        },
        "dataset": dataset,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
