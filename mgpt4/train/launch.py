"""``--gpus N`` / ``--hostfile FILE`` → DeepSpeed's launcher; otherwise train in this process.

The CLI process validates everything (exit code 2 before any process starts), writes the resolved
``RUN/config.yaml``, then either runs the worker itself or re-launches ``python -m mgpt4.train.worker
--config RUN/config.yaml`` through ``deepspeed.launcher.runner`` (which also does multi-node via a
hostfile and pdsh/ssh). On a CPU-only machine the launcher starts N gloo processes.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from mgpt4.config import save_config
from mgpt4.errors import Mgpt4Error, UsageError
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.metrics import read_metrics


@dataclasses.dataclass
class LaunchOptions:
    """How many processes, on which machines."""

    gpus: int = 1
    hostfile: str | None = None
    num_nodes: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.gpus > 1 or self.hostfile is not None or (self.num_nodes or 1) > 1


def run_training(cfg: TrainRunConfig, launch: LaunchOptions, command: str) -> dict[str, Any]:
    """Validate, save the resolved config, train (here or through the launcher); returns a summary."""
    cfg.validate()
    cfg.check_paths()
    if launch.gpus < 1:
        raise UsageError(f"--gpus: must be at least 1, got {launch.gpus}")
    if launch.hostfile is not None and not Path(launch.hostfile).is_file():
        raise UsageError(f"--hostfile {launch.hostfile}: no such file")
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    header = f"mgpt4 {command} --config {run / 'config.yaml'}"
    config_path = save_config(cfg, run / "config.yaml", header=header)
    if not launch.distributed:
        from mgpt4.train.engine import run_worker

        return run_worker(cfg)
    # The launcher and workers log to stdout (DeepSpeed's default); send that to our stderr (fd 2) so
    # that stdout holds only the summary (--json).
    result = subprocess.run(launcher_command(launch, config_path), stdout=2, check=False)
    if result.returncode != 0:
        raise Mgpt4Error(f"training processes exited with code {result.returncode}; see the log above")
    metrics = read_metrics(run)
    return {"run": str(run), "steps": cfg.train.max_steps, "processes": launch.gpus * (launch.num_nodes or 1),
            "final_loss": metrics[-1]["loss"] if metrics else None}  # fmt: skip


def launcher_command(launch: LaunchOptions, config_path: Path) -> list[str]:
    """The ``deepspeed`` launcher command line for the worker module."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(launch.gpus)]
    command += ["--no_local_rank"]
    if launch.hostfile:
        command += ["--hostfile", launch.hostfile]
    if launch.num_nodes:
        command += ["--num_nodes", str(launch.num_nodes)]
    if launch.master_addr:
        command += ["--master_addr", launch.master_addr]
    # One machine: a free port, so concurrent runs (tests, two users) do not collide on 29500.
    port = launch.master_port or (None if launch.hostfile else free_port())
    if port:
        command += ["--master_port", str(port)]
    return command + ["--module", "mgpt4.train.worker", "--config", str(config_path)]


def free_port() -> int:
    """A TCP port that is free on this machine now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
