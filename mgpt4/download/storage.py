"""Where the shards go: a local folder (plain os/pathlib I/O), or any fsspec URL.

    folder = open_output("shards/laion")            # LocalFolder: the fast path, unchanged guarantees
    folder = open_output("s3://bucket/laion/")      # RemoteFolder: s3://, gs://, hdfs://, file://, memory://

Both answer the few questions a run asks of its output: which files are there, read/write a small text
file atomically, read a parquet, hold the folder for one run. Shard files themselves are written by
``ShardWriter`` in a local folder; for a remote output that folder is a staging copy, published file by
file (``mgpt4.download.remote_shard``).

Locking: a local folder is held with ``flock`` (released by the kernel when the process dies). An object
store has no lock, so a remote folder gets a lease file (host, pid, renewed every 30 s): a second run
that finds a lease renewed in the last 2 minutes is refused, unless the lease's process ran on this
host and is gone (a killed run is resumed at once). It is a guard against mistakes, not a
mutex: two runs started within the same instant can both take it (the store's last write wins, and
each re-reads the lease once to catch most such races).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgpt4.errors import UsageError

LEASE_SECONDS = 120.0  # a remote lease not renewed for this long belongs to a run that is gone
_RENEW_SECONDS = 30.0
_HINT = "choose another output folder with -o"


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` goes through fsspec (``scheme://...``) rather than plain file I/O."""
    return "://" in str(location)


def open_output(location: str) -> LocalFolder | RemoteFolder:
    """The output folder for ``location`` (not created yet: see ``create``)."""
    return RemoteFolder(location) if is_url(location) else LocalFolder(Path(location))


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a URL; a missing backend package is the user's to install.

    Raises:
        UsageError: an unknown protocol, or its package (s3fs, gcsfs, ...) is not installed.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise UsageError(f"{url}: {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"{url}: {exc}") from exc


class LocalFolder:
    """A folder on this machine (or a shared mount): os/pathlib calls, flock, atomic renames."""

    is_remote = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def child(self, name: str) -> str:
        """The path of a file in the folder, for messages."""
        return str(self.path / name)

    def create(self) -> None:
        """Create the folder; a path that cannot be one is the user's to change (UsageError)."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path}: is a file, not a folder; {_HINT}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"{self.path}: cannot create the output folder ({exc.strerror or exc}); {_HINT}"
            ) from exc

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the folder for this run (``flock`` on ``name``; the kernel releases it if we die)."""
        try:
            handle = open(self.path / name, "w")  # noqa: SIM115 - `with handle` below closes it
        except OSError as exc:
            raise UsageError(
                f"{self.path}: cannot write to the output folder ({exc.strerror or exc}); {_HINT}"
            ) from exc
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise UsageError(f"{self.path}: another `mgpt4 download` is writing to this folder") from exc
            yield

    def names(self) -> set[str]:
        """The names of the files in the folder."""
        return {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()

    def read_texts(self, names: list[str]) -> dict[str, str]:
        """The text of each named file that exists and is readable."""
        out = {}
        for name in names:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                out[name] = (self.path / name).read_text()
        return out

    def read_parquet(self, name: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """The rows of a parquet file in the folder."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path / name, columns=columns).to_pylist()

    def local_copy(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """A local path holding the file's content (here: the file itself)."""
        return contextlib.nullcontext(self.path / name)


class RemoteFolder:
    """A folder behind fsspec. Whole-file writes go to a unique temporary name and are then moved."""

    is_remote = True

    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.root = filesystem(self.location)
        self.root = self.root.rstrip("/")

    def child(self, name: str) -> str:
        """The URL of a file in the folder, for messages."""
        return f"{self.location}/{name}"

    def path(self, name: str) -> str:
        """The filesystem path of a file in the folder (no protocol)."""
        return f"{self.root}/{name}"

    def create(self) -> None:
        """Create the folder (a no-op on object stores, which have no folders)."""
        try:
            if self.fs.isfile(self.root):
                raise UsageError(f"{self.location}: is a file, not a folder; {_HINT}")
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{self.location}: cannot create the output folder ({exc}); {_HINT}") from exc

    def names(self) -> set[str]:
        """The names of the files in the folder (read fresh: listing caches are dropped first)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        return {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}

    def read_texts(self, names: list[str]) -> dict[str, str]:
        """The text of each named file that exists (fetched concurrently where the store can)."""
        if not names:
            return {}
        paths = [self.path(n) for n in names]
        got = self.fs.cat(paths, on_error="omit") if len(paths) > 1 else _cat_one(self.fs, paths[0])
        out = {}
        for path, data in got.items():
            with contextlib.suppress(UnicodeDecodeError):
                out[str(path).rsplit("/", 1)[-1]] = data.decode()
        return out

    def read_parquet(self, name: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """The rows of a parquet file in the folder."""
        import pyarrow.parquet as pq

        with self.fs.open(self.path(name), "rb") as f:
            return pq.read_table(f, columns=columns).to_pylist()

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """The file downloaded into a temporary local file (deleted afterwards)."""
        with tempfile.TemporaryDirectory(prefix="mgpt4-") as tmp:
            local = Path(tmp) / name
            self.fs.get_file(self.path(name), str(local))
            yield local

    def write_from(self, local: Path, name: str) -> None:
        """Upload a local file under a unique temporary name, then move it to ``name``."""
        tmp = self.path(f"{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.put_file(str(local), tmp)
        self.fs.mv(tmp, self.path(name))

    def put_prefix(self, local: Path, size: int, name: str) -> None:
        """Upload the first ``size`` bytes of a local file as ``name`` (a torn copy is salvageable)."""
        with open(local, "rb") as src, self.fs.open(self.path(name), "wb") as dst:
            left = size
            while left > 0:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                left -= len(chunk)

    def remove(self, name: str) -> None:
        """Delete a file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the folder with a lease file renewed every 30 s (see the module docstring)."""
        path = self.path(name)
        held = self._lease(path)
        if held is not None and _lease_live(held):
            raise self._busy(held, path)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        try:
            self._renew(path, me)
        except OSError as exc:
            raise UsageError(f"{self.location}: cannot write to the output folder ({exc}); {_HINT}") from exc
        held = self._lease(path)
        if held is None or held.get("token") != me["token"]:  # another run wrote its lease at the same time
            raise self._busy(held or {}, path)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(_RENEW_SECONDS):
                with contextlib.suppress(OSError):
                    self._renew(path, me)

        thread = threading.Thread(target=renew, daemon=True, name="mgpt4-lease")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            with contextlib.suppress(OSError):
                self.fs.rm_file(path)

    def _lease(self, path: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _renew(self, path: str, me: dict[str, Any]) -> None:
        self.fs.pipe_file(path, json.dumps({**me, "renewed": time.time()}).encode())

    def _busy(self, held: dict[str, Any], path: str) -> UsageError:
        age = time.time() - float(held.get("renewed", time.time()))
        return UsageError(
            f"{self.location}: another `mgpt4 download` is writing to this folder (host {held.get('host')}, "
            f"pid {held.get('pid')}, lease renewed {age:.0f} s ago); if that run is gone, delete "
            f"{self.fs.unstrip_protocol(path)} or wait {LEASE_SECONDS:.0f} s"
        )


def _lease_live(held: dict[str, Any]) -> bool:
    """A lease renewed within ``LEASE_SECONDS`` by a process that, if it ran on this host, still exists."""
    if time.time() - float(held.get("renewed", 0)) >= LEASE_SECONDS:
        return False
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return True
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return False  # killed here: no need to wait for the lease to expire
    except PermissionError:
        pass  # another user's process: alive
    return True


def _cat_one(fs: Any, path: str) -> dict[str, bytes]:
    try:
        return {path: fs.cat_file(path)}
    except FileNotFoundError:
        return {}
