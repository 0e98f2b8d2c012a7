"""Run metrics: ``metrics.jsonl`` lines, live progress, peak memory, and the loss-curve PNG."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mgpt4.console import err_console, is_interactive
from mgpt4.errors import UsageError

log = logging.getLogger("mgpt4.train")

METRICS_FILE = "metrics.jsonl"


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """All metric lines of a run (empty when there are none yet).

    A line that is not a whole JSON record — the last one, torn by a kill mid-write — is left out
    with a warning; the next run's ``truncate_metrics`` drops it from the file.
    """
    file = Path(run) / METRICS_FILE
    if not file.is_file():
        return []
    records = []
    for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            log.warning("%s line %d is not a whole metrics record (torn by a kill?); left out", file, number)
            continue
        records.append(record)
    return records


def truncate_metrics(run: Path, after_step: int) -> None:
    """Keep whole lines of steps up to ``after_step``: a resumed run (a fresh one: 0) logs the rest again."""
    if not (run / METRICS_FILE).exists():
        return
    kept = [m for m in read_metrics(run) if m["step"] <= after_step]
    tmp = run / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    tmp.replace(run / METRICS_FILE)


class MetricsLog:
    """Rank-0 writer of ``metrics.jsonl`` plus progress: a rich bar on a TTY, log lines otherwise."""

    def __init__(
        self, run: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool
    ) -> None:
        self.enabled = enabled
        self.file = (run / METRICS_FILE).open("a") if enabled else None
        self.progress: Progress | None = None
        self.writer = None
        if enabled and is_interactive():
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=err_console, transient=False,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tensorboard"))
        self.started = time.monotonic()

    def step(self, record: dict[str, Any], write: bool) -> None:
        """Show one optimizer step; write it to metrics.jsonl when ``write``."""
        if not self.enabled:
            return
        status = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], status=status)
        elif write:
            log.info("step %d  %s", record["step"], status)
        if write:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.writer is not None:
                for key in ("loss", "lr", "samples_per_s", "tokens_per_s"):
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_loss(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curve of a run as a PNG (default ``RUN/loss.png``).

    Raises:
        UsageError: ``out`` is a folder or cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(run) if "loss" in m]  # eval lines ({"step", "eval"}) have none
    out = Path(out) if out else Path(run) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1.5)
    ax.set(xlabel="step", ylabel="loss", title=f"{Path(run).name}: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    try:
        if out.is_dir():
            raise IsADirectoryError(21, "is a folder")
        fig.savefig(tmp)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{out}: cannot write the plot ({exc.strerror}); choose a writable path") from None
    finally:
        plt.close(fig)
    return out
