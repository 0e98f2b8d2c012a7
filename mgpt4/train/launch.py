"""``--gpus N`` / ``--hostfile FILE`` → DeepSpeed's launcher; otherwise train in this process.

The CLI process checks everything first (exit code 2 before any process starts), takes the run
directory's lock, picks the checkpoint to resume from (``mgpt4.train.resume``), truncates
``metrics.jsonl`` to it, writes the resolved ``RUN/config.yaml``, then either runs the worker itself or
re-launches ``python -m mgpt4.train.worker --config RUN/config.yaml`` through
``deepspeed.launcher.runner`` (which also does multi-node via a hostfile and pdsh/ssh). On a CPU-only
machine the launcher starts N gloo processes. Workers on this machine stop when this process ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from mgpt4.config import save_config
from mgpt4.errors import Mgpt4Error, UsageError
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.metrics import read_metrics, truncate_metrics
from mgpt4.train.resume import apply_plan, checkpoints_dir, plan_resume
from mgpt4.train.run_dir import RunLock, check_same_settings, prepare_run_dir

log = logging.getLogger("mgpt4.train")

WATCH_PID_ENV = "MGPT4_WATCH_PID"  # workers on this machine exit when this pid ends (worker.py)
CPU_PROCESSES_PER_CORE = 2  # gloo processes on a CPU machine: beyond this they only queue for cores


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

    def check(self) -> None:
        """``--gpus`` within what this machine has, the hostfile present (raises ``UsageError``)."""
        if self.gpus < 1:
            raise UsageError(f"--gpus: must be at least 1, got {self.gpus}")
        if self.hostfile is not None:
            if not Path(self.hostfile).is_file():
                raise UsageError(f"--hostfile {self.hostfile}: no such file")
            return  # the hostfile's slots decide; DeepSpeed checks them on each node
        import torch

        if torch.cuda.is_available():
            devices = torch.cuda.device_count()
            if self.gpus > devices:
                raise UsageError(f"--gpus {self.gpus}: only {devices} CUDA device(s) visible here")
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.gpus > CPU_PROCESSES_PER_CORE * cores:
            raise UsageError(
                f"--gpus {self.gpus}: this CPU machine has {cores} cores, so at most "
                f"{CPU_PROCESSES_PER_CORE * cores} training processes; lower --gpus"
            )


def run_training(cfg: TrainRunConfig, launch: LaunchOptions, command: str) -> dict[str, Any]:
    """Validate, lock the run, pick the resume point, train (here or through the launcher); returns a summary.

    A run already at ``train.max_steps`` trains nothing and returns its summary with ``already_finished``.
    With ``eval.task`` the final checkpoint is then evaluated (``mgpt4.train.final_eval``), also when the
    run had finished before (the eval resumes, or redoes nothing), and the summary holds its metrics.
    """
    cfg.validate()
    cfg.check_paths()
    launch.check()
    run = prepare_run_dir(cfg.out)
    with RunLock(run):
        plan = plan_resume(run)
        if plan.folder is not None:
            check_same_settings(cfg, run)
            if plan.step >= cfg.train.max_steps:
                summary = _summary(run, cfg, plan.step, launch, already_finished=True)
                return _with_final_eval(summary, cfg, run, plan.folder, plan.step)
            processes = launch.gpus * (launch.num_nodes or 1)
            if launch.hostfile is None and processes != plan.world_size:
                raise UsageError(
                    f"--gpus {launch.gpus}: {plan.folder} was saved by {plan.world_size} processes and its "
                    f"ZeRO state cannot be split differently; resume with --gpus {plan.world_size}"
                )
        apply_plan(plan)
        truncate_metrics(run, plan.step)  # lines of steps after the checkpoint are trained again
        header = f"mgpt4 {command} --config {run / 'config.yaml'}"
        # The judge's API key stays in the environment or the recipe, never in the run directory.
        saved = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, judge=dataclasses.replace(
            cfg.eval.judge, key=None)))  # fmt: skip
        config_path = save_config(saved, run / "config.yaml", header=header)
        if not launch.distributed:
            from mgpt4.train.engine import run_worker

            summary = run_worker(cfg, plan.folder)
        else:
            # The launcher and workers log to stdout (DeepSpeed's default); send that to our stderr (fd 2)
            # so that stdout holds only the summary (--json).
            env = {**os.environ, WATCH_PID_ENV: str(os.getpid())}
            command_line = launcher_command(launch, config_path, plan.folder)
            result = subprocess.run(command_line, stdout=2, env=env, check=False)
            if result.returncode != 0:
                raise Mgpt4Error(
                    f"training processes exited with code {result.returncode}; see the log above"
                )
            summary = _summary(run, cfg, plan.step, launch)
        final = checkpoints_dir(run) / f"step-{cfg.train.max_steps}"
        return _with_final_eval(summary, cfg, run, final, cfg.train.max_steps)


def _with_final_eval(summary: dict[str, Any], cfg: TrainRunConfig, run: Path, checkpoint: Path,
                     step: int) -> dict[str, Any]:  # fmt: skip
    if cfg.eval.task is None:
        return summary
    from mgpt4.train.final_eval import run_final_eval

    return {**summary, **run_final_eval(cfg, run, checkpoint, step)}


def _summary(run: Path, cfg: TrainRunConfig, resumed_from: int, launch: LaunchOptions,
             already_finished: bool = False) -> dict[str, Any]:  # fmt: skip
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]  # eval lines hold none
    summary = {"run": str(run), "steps": cfg.train.max_steps, "resumed_from": resumed_from,
               "processes": launch.gpus * (launch.num_nodes or 1),
               "final_loss": losses[-1] if losses else None}  # fmt: skip
    if already_finished:
        summary["already_finished"] = True
    return summary


def launcher_command(launch: LaunchOptions, config_path: Path, resume: Path | None = None) -> list[str]:
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
    command += ["--module", "mgpt4.train.worker", "--config", str(config_path)]
    return command + (["--resume", str(resume)] if resume is not None else [])


def free_port() -> int:
    """A TCP port that is free on this machine now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
