"""The run directory before training starts: writable, locked to one run, same settings on resume.

The ``mgpt4 pretrain``/``finetune`` process holds an exclusive ``flock`` on ``RUN/.lock`` (its pid
inside) for the run's whole life, so a second command on the same folder stops at once instead of
racing the first for ``checkpoints/`` and ``metrics.jsonl``. The kernel drops the lock when the
process ends, however it ends; its launched workers stop with it (``mgpt4.train.launch.exit_when_gone``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from mgpt4.config import load_config, to_dict, to_dotted
from mgpt4.errors import Mgpt4Error, UsageError
from mgpt4.train.config import TrainRunConfig

LOCK_FILE = ".lock"

# Settings a resumed run may change: how long it runs, how its data is decoded (workers decode the same
# batches as the training process), what it writes besides the checkpoints, and its final eval.
# Everything else decides what the checkpoint holds or which batches come next.
RESUME_MAY_CHANGE = frozenset(
    {"out", "train.max_steps", "train.log_every", "train.save_every", "train.keep_last", "train.tensorboard",
     "train.plot", "data.num_workers", "data.prefetch"}
)  # fmt: skip
RESUME_MAY_CHANGE_SECTIONS = ("eval.",)


def prepare_run_dir(out: str) -> Path:
    """Create the run folder, or say in one line why it cannot be one.

    Raises:
        UsageError: ``out`` is a file, or cannot be created or written.
    """
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise UsageError(f"out: {run} is a file; give a folder for the run (out=DIR)")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"out: cannot create {run} ({exc.strerror}); choose a writable folder") from exc
    if not os.access(run, os.W_OK | os.X_OK):
        raise UsageError(f"out: {run} is not writable; choose a writable folder")
    return run


class RunLock:
    """Exclusive lock on ``RUN/.lock`` while the run lives (a context manager).

    Raises (on enter):
        Mgpt4Error: another process holds it (the message names its pid).
        UsageError: the lock file cannot be created.
    """

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(
                f"out: cannot write {self.path} ({exc.strerror}); choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Mgpt4Error(
                f"out: {self.path.parent} is in use by another training run (pid {holder}); wait for it to "
                "finish or stop it, or choose another out="
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def check_same_settings(cfg: TrainRunConfig, run: Path) -> None:
    """A resume must use the settings the run was saved with, except ``RESUME_MAY_CHANGE`` and ``eval.*``.

    Raises:
        UsageError: naming the first differing keys, before anything in the run is written.
    """
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        return
    saved = to_dotted(to_dict(load_config(TrainRunConfig, saved_path)))
    wanted = to_dotted(to_dict(cfg))
    fixed = [k for k in wanted if k not in RESUME_MAY_CHANGE and not k.startswith(RESUME_MAY_CHANGE_SECTIONS)]
    differ = [key for key in fixed if wanted[key] != saved.get(key)]
    if differ:
        changes = ", ".join(f"{key}={saved.get(key)!r} (now {wanted[key]!r})" for key in differ[:3])
        raise UsageError(
            f"out: {run} was saved with {changes}; resume it with the same settings, or choose a new out="
        )
