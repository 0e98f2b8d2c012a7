"""One shard of a remote (fsspec) output: written in a local staging folder, published file by file.

An object store has no append and no rename, so the crash-safe writing itself (``ShardWriter``: partial
tar flushed per sample, journal per row) happens in ``$TMPDIR/mgpt4-download-<hash>-NNNNN/`` (removed
when the shard is done; one shard's worth of disk per running shard). The remote folder gets the same
files in the same order as a local run leaves them, so the same salvage logic reads them back:

- before the shard starts, whatever an earlier run left remotely (complete tar + parquet, partial tar,
  journal) is copied into the staging folder, and ``ShardWriter.open`` salvages it as it would locally;
- every ``checkpoint_seconds`` while it runs, and when it is stopped, the partial tar and the journal are
  uploaded as ``NNNNN.tar.partial`` / ``NNNNN_journal.jsonl`` (a copy cut short is a torn tar and a torn
  journal line, which salvage already tolerates); a kill loses at most the rows since the last upload,
  and they are fetched again;
- completing it mirrors ``ShardWriter.finalize``: the whole tar as the partial and every record as the
  journal, then the parquet under a temporary name, the stats unmarked, tar and parquet moved into place,
  the journal removed, and ``NNNNN_stats.json`` (through a temporary name) last. A reader that sees the
  stats sees a whole shard; a rerun cut in anywhere finds every row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from mgpt4.download.shard_writer import shard_name
from mgpt4.download.storage import RemoteFolder

log = logging.getLogger("mgpt4.download")


class RemoteShard:
    """The staging folder of one shard of ``folder`` and its uploads."""

    def __init__(self, folder: RemoteFolder, shard_id: int) -> None:
        self.folder = folder
        self.name = shard_name(shard_id)
        digest = hashlib.sha1(folder.location.encode()).hexdigest()[:12]
        # One path per (output, shard): a staging folder left by a killed process is cleared on reuse.
        self.staging = Path(tempfile.gettempdir()) / f"mgpt4-download-{digest}-{self.name}"

    def stage(self) -> Path:
        """A fresh staging folder holding what earlier runs left remotely for this shard."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        names = self.folder.names()
        for leftover in sorted(n for n in names if n.startswith(self.name) and ".tmp-" in n):
            self.folder.remove(leftover)  # a temporary upload of a killed run
        for suffix in (".tar", ".parquet", "_journal.jsonl", ".tar.partial"):
            name = self.name + suffix
            if name in names:
                with contextlib.suppress(FileNotFoundError):
                    self.folder.fs.get_file(self.folder.path(name), str(self.staging / name))
        return self.staging

    def checkpoint(self, tar_bytes: int, journal_bytes: int) -> None:
        """Upload the first bytes of the partial tar and journal (both only grow while a shard runs)."""
        self.folder.put_prefix(
            self.staging / f"{self.name}.tar.partial", tar_bytes, f"{self.name}.tar.partial"
        )
        journal = self.staging / f"{self.name}_journal.jsonl"
        self.folder.put_prefix(journal, journal_bytes, journal.name)

    def save_partial(self) -> None:
        """Upload the stopped shard's partial tar and journal whole, for the next run to salvage."""
        for name in (f"{self.name}.tar.partial", f"{self.name}_journal.jsonl"):
            local = self.staging / name
            if local.is_file():
                self.folder.put_prefix(local, local.stat().st_size, name)

    def publish(self) -> None:
        """Upload the completed shard (``ShardWriter.finalize`` has run in the staging folder)."""
        import pyarrow.parquet as pq

        name, f = self.name, self.folder
        tar, parquet, stats = (self.staging / f"{name}{s}" for s in (".tar", ".parquet", "_stats.json"))
        journal = self.staging / f"{name}_journal.jsonl"
        records = pq.read_table(parquet).to_pylist()
        journal.write_text("".join(json.dumps(r) + "\n" for r in records))
        f.write_from(tar, f"{name}.tar.partial")
        f.write_from(journal, journal.name)
        parquet_tmp = f"{name}.parquet.tmp"
        f.write_from(parquet, parquet_tmp)
        f.remove(stats.name)  # unmark first: until the stats are back the shard is incomplete
        f.fs.mv(f.path(f"{name}.tar.partial"), f.path(tar.name))
        f.fs.mv(f.path(parquet_tmp), f.path(parquet.name))
        f.remove(journal.name)
        f.write_from(stats, stats.name)  # the completion marker, last

    def cleanup(self) -> None:
        """Delete the staging folder."""
        shutil.rmtree(self.staging, ignore_errors=True)
