"""Run ``mgpt4`` in this process and SIGKILL it at an exact moment of its file writing.

    python tests/helpers/kill_at.py addfile:31 -- download urls.jsonl -o out --processes 1

Kill points (``POINT[,POINT...]``; the first one reached kills the process):

- ``addfile:N`` — at the start of the N-th tar member written (tarfile.TarFile.addfile), so the N-1
  members before it are all that reached the writer's buffer;
- ``torn:N`` — during the N-th tar member: its header and half its data reach the file, then the kill
  (the process died mid-write of the tar);
- ``after-replace:NAME`` — right after a file named NAME is renamed into place (pathlib.Path.replace),
  e.g. ``00000.tar.partial`` (the tar is complete, its parquet and stats are not written yet);
- ``after-mv:NAME`` — right after an fsspec move onto a file named NAME (remote output), e.g.
  ``00000.tar`` (the tar is in place remotely, its parquet and stats are not).

Only public stdlib functions are wrapped, so the code under test runs unchanged; the kill is a real
SIGKILL: no ``finally`` blocks, no flushing of Python buffers.
"""

from __future__ import annotations

import os
import signal
import sys
import tarfile
import threading
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(points: list[str]) -> None:
    """Wrap the stdlib functions the kill points watch."""
    addfile_at = {int(p.split(":")[1]) for p in points if p.startswith("addfile:")}
    torn_at = {int(p.split(":")[1]) for p in points if p.startswith("torn:")}
    replaced = {p.split(":", 1)[1] for p in points if p.startswith("after-replace:")}
    moved = {p.split(":", 1)[1] for p in points if p.startswith("after-mv:")}
    lock = threading.Lock()
    calls = [0]
    original_addfile = tarfile.TarFile.addfile
    original_replace = Path.replace

    def addfile(self: tarfile.TarFile, tarinfo: tarfile.TarInfo, fileobj=None, *args, **kwargs):  # noqa: ANN001
        with lock:
            calls[0] += 1
            n = calls[0]
            if n in addfile_at:
                _die()
            if n in torn_at:
                data = fileobj.read() if fileobj is not None else b""
                header = tarinfo.tobuf(self.format, self.encoding, self.errors)
                self.fileobj.write(header + data[: max(1, len(data) // 2)])
                self.fileobj.flush()
                _die()
        return original_addfile(self, tarinfo, fileobj, *args, **kwargs)

    def replace(self: Path, target):  # noqa: ANN001
        result = original_replace(self, target)
        if self.name in replaced:
            _die()
        return result

    tarfile.TarFile.addfile = addfile  # type: ignore[method-assign]
    Path.replace = replace  # type: ignore[method-assign]
    if moved:
        import fsspec.spec

        original_mv = fsspec.spec.AbstractFileSystem.mv

        def mv(self, path1, path2, *args, **kwargs):  # noqa: ANN001
            result = original_mv(self, path1, path2, *args, **kwargs)
            if str(path2).rstrip("/").rsplit("/", 1)[-1] in moved:
                _die()
            return result

        fsspec.spec.AbstractFileSystem.mv = mv  # type: ignore[method-assign]


if __name__ == "__main__":
    split = sys.argv.index("--")
    install(",".join(sys.argv[1:split]).split(","))
    from mgpt4.cli import main

    main(sys.argv[split + 1 :])
