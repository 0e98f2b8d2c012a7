"""Check that an output path can be written before any work starts (describe -o, chat /save, curate --out).

Permissions alone cannot answer that (root ignores them; read-only mounts, /proc and full quotas do
not), so the check creates the missing parent folders and a probe file beside the output, then
removes the probe: exactly what the later temp-file-and-rename write needs.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from mgpt4.errors import UsageError


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """Make sure ``path`` (a file, or a folder when ``folder``) can be written; returns it expanded.

    Missing parent folders (and the folder itself when ``folder``) are created.

    Args:
        path: the output path as the user gave it.
        what: how the message names it, e.g. ``--output`` or ``/save``.
        folder: the output is a folder that files go into.

    Raises:
        UsageError: it exists as the wrong kind (a file where a folder is needed or the reverse), a
            parent is a file, or nothing can be created there.
    """
    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{what} {path}: is a file, not a folder; give a folder path")
    if not folder and target.is_dir():
        raise UsageError(f"{what} {path}: is a folder; give a file path")
    directory = target if folder else target.parent
    probe = directory / f".mgpt4-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, FileExistsError | NotADirectoryError):
            reason = "a part of the path is a file, not a folder"
        raise UsageError(f"{what} {path}: cannot write there ({reason})") from exc
    return target
