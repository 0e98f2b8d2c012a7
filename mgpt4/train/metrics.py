"""Run metrics: ``metrics.jsonl`` lines, progress through a callback, peak memory, the loss-curve PNG."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mgpt4.errors import UsageError

log = logging.getLogger("mgpt4.train")

METRICS_FILE = "metrics.jsonl"

# Called on rank 0 after every optimizer step with its metrics record (step, loss, lr, samples_per_s, …)
# and train.max_steps; the CLI draws a progress bar from it.
StepProgress = Callable[[dict[str, Any], int], None]


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
    """Rank-0 writer of ``metrics.jsonl``; each step also goes to ``progress``, or a log line per write."""

    def __init__(
        self,
        run: Path,
        total_steps: int,
        enabled: bool,
        tensorboard: bool,
        progress: StepProgress | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress
        self.file = (run / METRICS_FILE).open("a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tensorboard"))
        self.started = time.monotonic()

    def step(self, record: dict[str, Any], write: bool) -> None:
        """Report one optimizer step; write it to metrics.jsonl when ``write``."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress(record, self.total_steps)
        elif write:
            log.info("step %d  %s", record["step"], step_status(record))
        if write:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.writer is not None:
                for key in ("loss", "lr", "samples_per_s", "tokens_per_s"):
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def step_status(record: dict[str, Any]) -> str:
    """One step's loss, learning rate and speed, as the log lines and the progress bar show them."""
    return f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s"


def plot_loss(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curve of a run as a PNG (default ``RUN/loss.png``).

    Raises:
        UsageError: ``out`` is a folder or cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run)
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
