"""One output shard on disk: written crash-safely, salvaged after a crash, completed atomically.

While a shard is being written it exists only as ``NNNNN.tar.partial`` (samples, flushed one by one)
and ``NNNNN_journal.jsonl`` (one line per finished input row, success or failure). Completing it
renames the tar into place, writes ``NNNNN.parquet`` (every row, with status and error) and finally
``NNNNN_stats.json``: the stats file is the completion marker, so a reader that sees it sees a whole
shard, and a shard without it is redone.

Redoing is not restarting: ``ShardWriter.open`` salvages every row the journal records whose sample
(if it succeeded) made it into the partial tar intact, so a run killed at 90 % of a shard fetches only
the missing 10 % again. The same mechanism, fed by a complete shard's parquet and tar, lets
``--retry-failed`` re-fetch just the rows that failed for transient reasons.

What an earlier run left is read in layers, newest on top, so a kill at any instant loses nothing that
was stored: records are the complete shard's parquet overlaid with the journal; a success keeps its
sample from the partial tar (or a salvage cut short) if it is there, else from the complete tar. A
``--retry-failed`` killed while it was copying a complete shard into a new partial tar leaves a partial
holding only some samples: the complete tar, which is replaced only when the new one is whole, still
has the rest.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RECORD_FIELDS = (
    "key",
    "url",
    "caption",
    "status",
    "error_message",
    "error_kind",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)
SAMPLE_EXTS = ("jpg", "txt", "json")
# Fields of the per-sample KEY.json inside the tar (img2dataset's names; the official loader reads "caption").
_SAMPLE_JSON_FIELDS = (
    "key",
    "url",
    "caption",
    "status",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "error_message",
)
_MAX_STATUS_MESSAGES = 1000  # distinct error messages kept in stats (img2dataset caps its counter too)


def shard_name(shard_id: int) -> str:
    """``00042`` for shard 42 (five digits, as img2dataset names shards)."""
    return f"{shard_id:05d}"


def read_records(folder: Path, shard_id: int) -> list[dict[str, Any]]:
    """The per-row records of a complete shard (from its parquet)."""
    import pyarrow.parquet as pq

    return pq.read_table(folder / f"{shard_name(shard_id)}.parquet").to_pylist()


class ShardWriter:
    """Writes one shard; see the module docstring for the files and their order."""

    def __init__(self, folder: Path, shard_id: int) -> None:
        self.folder = Path(folder)
        self.shard_id = shard_id
        name = shard_name(shard_id)
        self.tar_path = self.folder / f"{name}.tar"
        self.partial_path = self.folder / f"{name}.tar.partial"
        self.salvage_path = self.folder / f"{name}.tar.salvage"
        self.journal_path = self.folder / f"{name}_journal.jsonl"
        self.parquet_path = self.folder / f"{name}.parquet"
        self.stats_path = self.folder / f"{name}_stats.json"
        self.records: dict[str, dict[str, Any]] = {}
        self.start_time = time.time()
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._journal: Any = None

    # ---------------------------------------------------------------------------------------------
    # opening: salvage what an earlier run left, then continue writing
    # ---------------------------------------------------------------------------------------------

    def open(self, keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> dict[str, dict[str, Any]]:
        """Start (or resume) writing; returns the salvaged records by key, which need no fetching.

        Args:
            keep: which earlier records to keep; the others are fetched again (``--retry-failed``).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        records = {k: r for k, r in self._earlier_records().items() if keep(r)}
        sources = self._salvage_sources()
        self._file = open(self.partial_path, "wb")  # closed in finalize() or close()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        copied = self._copy_samples(sources, records)
        self.records = {k: r for k, r in records.items() if r["status"] != "success" or k in copied}
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records.values())
        tmp.replace(self.journal_path)
        # Only now does the new partial hold every salvaged sample: until here a kill leaves the salvage.
        self.salvage_path.unlink(missing_ok=True)
        self._journal = open(self.journal_path, "a")  # closed in finalize() or close()
        return dict(self.records)

    def _earlier_records(self) -> dict[str, dict[str, Any]]:
        """A complete shard's parquet (if any), overlaid by the journal of the run that was redoing it."""
        records: dict[str, dict[str, Any]] = {}
        if self.parquet_path.is_file() and self.tar_path.is_file():
            try:
                records = {r["key"]: r for r in read_records(self.folder, self.shard_id)}
            except (OSError, ValueError):
                records = {}
        if self.journal_path.is_file():
            with open(self.journal_path, errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # the line being written when the process died
                    if isinstance(record, dict) and "key" in record and "status" in record:
                        records[record["key"]] = record  # later lines win
        return records

    def _salvage_sources(self) -> list[Path]:
        """The tars holding earlier samples, newest first.

        A leftover ``.salvage`` means an earlier salvage was cut short: it still holds everything, and the
        ``.partial`` beside it only a part. The complete tar comes last: samples the newer tars lack
        (a copy cut short) are still there.
        """
        if self.salvage_path.is_file():
            self.partial_path.unlink(missing_ok=True)
        elif self.partial_path.is_file():
            self.partial_path.replace(self.salvage_path)
        return [p for p in (self.salvage_path, self.tar_path) if p.is_file()]

    def _copy_samples(self, sources: list[Path], records: dict[str, dict[str, Any]]) -> set[str]:
        """Copy each successful record's sample once, from the first source holding that very image."""
        wanted = {k for k, r in records.items() if r["status"] == "success"}
        copied: set[str] = set()
        for source in sources:
            if len(copied) == len(wanted):
                break
            for key, files in _read_samples(source):
                if key in wanted and key not in copied and _same_image(files, records[key]):
                    self._write_sample(key, files)
                    copied.add(key)
        return copied

    # ---------------------------------------------------------------------------------------------
    # writing
    # ---------------------------------------------------------------------------------------------

    def add(self, record: dict[str, Any], jpeg: bytes | None = None) -> None:
        """Record one finished row; a success also stores its sample (jpg, caption txt, json)."""
        assert self._tar is not None and self._journal is not None, "open() first"
        if jpeg is not None:
            meta = {name: record.get(name) for name in _SAMPLE_JSON_FIELDS}
            files = {
                "jpg": jpeg,
                "txt": (record.get("caption") or "").encode(),
                "json": json.dumps(meta).encode(),
            }
            self._write_sample(record["key"], files)
            self._file.flush()  # the sample reaches the OS before the journal says it exists
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        self.records[record["key"]] = record

    def _write_sample(self, key: str, files: dict[str, bytes]) -> None:
        mtime = time.time()
        for ext in SAMPLE_EXTS:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(files[ext])
            info.mtime = mtime
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(files[ext]))

    def flushed_sizes(self) -> tuple[int, int]:
        """Bytes of the partial tar and the journal written so far, flushed to the OS (call under the
        lock that serialises ``add``: both then end on a whole sample and a whole line)."""
        assert self._file is not None and self._journal is not None, "open() first"
        self._file.flush()
        self._journal.flush()
        return self._file.tell(), self._journal.tell()

    def finalize(self) -> dict[str, Any]:
        """Complete the shard: tar → parquet → stats (the completion marker, last). Returns the stats."""
        assert self._tar is not None, "open() first"
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._journal.close()
        self._tar = self._file = self._journal = None
        parquet_tmp = self.parquet_path.with_name(self.parquet_path.name + ".tmp")
        _write_parquet(parquet_tmp, sorted(self.records.values(), key=lambda r: r["key"]))
        stats = self.stats()
        # Unmark first: between the renames below the shard is incomplete, and a rerun must see it so.
        # A rerun cut in anywhere below finds every row: in the journal (overlaying the parquet, old or
        # new) with its sample in the new tar, or, once the journal is gone, in the new parquet.
        self.stats_path.unlink(missing_ok=True)
        self.partial_path.replace(self.tar_path)
        parquet_tmp.replace(self.parquet_path)
        self.journal_path.unlink(missing_ok=True)
        stats_tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        stats_tmp.write_text(json.dumps(stats, indent=4))
        stats_tmp.replace(self.stats_path)
        return stats

    def close(self) -> None:
        """Stop without completing (interrupted): the partial tar and journal stay for the next run.

        The tar is left without its end-of-archive blocks, exactly as a killed process leaves it, so
        ``open`` has one kind of partial tar to salvage.
        """
        for handle in (self._file, self._journal):
            if handle is not None:
                try:
                    handle.close()
                except (OSError, ValueError):
                    pass
        self._tar = self._file = self._journal = None

    def stats(self) -> dict[str, Any]:
        """img2dataset's stats fields, plus ``error_kinds`` (counts by machine-readable reason)."""
        statuses = Counter(r["status"] for r in self.records.values())
        messages = Counter(r["error_message"] or "success" for r in self.records.values())
        kinds = Counter(r["error_kind"] for r in self.records.values() if r["error_kind"])
        end = time.time()
        return {
            "count": len(self.records),
            "successes": statuses["success"],
            "failed_to_download": statuses["failed_to_download"],
            "failed_to_resize": statuses["failed_to_resize"],
            "duration": end - self.start_time,
            "start_time": self.start_time,
            "end_time": end,
            "status_dict": dict(messages.most_common(_MAX_STATUS_MESSAGES)),
            "error_kinds": dict(kinds.most_common()),
        }


def _read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Complete samples (jpg + txt + json, json parseable) of a tar that may end mid-member."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                name_key, _, ext = member.name.partition(".")
                handle = tar.extractfile(member) if member.isfile() else None
                data = handle.read() if handle is not None else b""
                if handle is not None and len(data) != member.size:
                    break  # the member the process was writing when it died
                if name_key != key:
                    if key is not None and _complete(files):
                        yield key, files
                    key, files = name_key, {}
                files[ext] = data
    except (tarfile.TarError, EOFError, OSError):
        pass  # a torn tail: everything before it was yielded
    if key is not None and _complete(files):
        yield key, files


def _same_image(files: dict[str, bytes], record: dict[str, Any]) -> bool:
    """Whether a stored sample is the one ``record`` describes (same URL, and same bytes when known)."""
    meta = json.loads(files["json"])
    if not isinstance(meta, dict) or meta.get("url") != record["url"]:
        return False
    return record.get("sha256") is None or meta.get("sha256") == record["sha256"]


def _complete(files: dict[str, bytes]) -> bool:
    if not all(ext in files for ext in SAMPLE_EXTS):
        return False
    try:
        json.loads(files["json"])
    except ValueError:
        return False
    return True


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = {"width", "height", "original_width", "original_height"}
    schema = pa.schema([(name, pa.int32() if name in ints else pa.string()) for name in RECORD_FIELDS])
    table = pa.Table.from_pylist([{k: r.get(k) for k in RECORD_FIELDS} for r in records], schema=schema)
    with open(path, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
