"""``--gpus N`` / ``--hostfile FILE`` → DeepSpeed's launcher; otherwise train in this process.

The CLI process validates everything (exit code 2 before any process starts), writes the resolved
``RUN/config.yaml``, then either runs the worker itself or re-launches ``python -m mgpt4.train.worker
--config RUN/config.yaml`` through ``deepspeed.launcher.runner`` (which also does multi-node via a
hostfile and pdsh/ssh). On a CPU-only machine the launcher starts N gloo processes.
"""

from __future__ import annotations

import dataclasses
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
    config_path = save_config(cfg, run / "config.yaml", header=f"mgpt4 {command} --config {run / 'config.yaml'}")
    if not launch.distributed:
        from mgpt4.train.engine import run_worker

        return run_worker(cfg)
    result = subprocess.run(launcher_command(launch, config_path), check=False)
    if result.returncode != 0:
        raise Mgpt4Error(f"training processes exited with code {result.returncode}; see the log above")
    metrics = read_metrics(run)
    return {"run": str(run), "steps": cfg.train.max_steps, "processes": launch.gpus * (launch.num_nodes or 1),
            "final_loss": metrics[-1]["loss"] if metrics else None}  # fmt: skip


def launcher_command(launch: LaunchOptions, config_path: Path) -> list[str]:
    """The ``deepspeed`` launcher command line for the worker module."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(launch.gpus), "--no_local_rank"]
    if launch.hostfile:
        command += ["--hostfile", launch.hostfile]
    if launch.num_nodes:
        command += ["--num_nodes", str(launch.num_nodes)]
    if launch.master_addr:
        command += ["--master_addr", launch.master_addr]
    if launch.master_port:
        command += ["--master_port", str(launch.master_port)]
    return command + ["--module", "mgpt4.train.worker", "--config", str(config_path)]
