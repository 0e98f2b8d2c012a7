"""``--gpus N`` / ``--hostfile FILE`` → DeepSpeed's launcher; otherwise train in this process.

The CLI process checks everything first (exit code 2 before any process starts), takes the run
directory's lock, picks the checkpoint to resume from (``mgpt4.train.resume``), truncates
``metrics.jsonl`` to it, writes the resolved ``RUN/config.yaml``, then either runs the worker itself or
re-launches ``python -m mgpt4.cli.worker --config RUN/config.yaml`` through
``deepspeed.launcher.runner`` (which also does multi-node via a hostfile and pdsh/ssh). On a CPU-only
machine the launcher starts N gloo processes. Workers on this machine stop when this process ends
(``exit_when_gone``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mgpt4.config import save_config
from mgpt4.errors import Mgpt4Error, UsageError
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.launch_options import LaunchOptions
from mgpt4.train.metrics import StepProgress, read_metrics, truncate_metrics
from mgpt4.train.resume import apply_plan, checkpoints_dir, plan_resume
from mgpt4.train.run_dir import RunLock, check_same_settings, prepare_run_dir

log = logging.getLogger("mgpt4.train")

WATCH_PID_ENV = "MGPT4_WATCH_PID"  # workers on this machine exit when this pid ends (exit_when_gone)
WORKER_MODULE = "mgpt4.cli.worker"  # the entry point of one launched training process


@dataclasses.dataclass
class TrainSummary:
    """What ``run_training`` did (``to_json`` is the ``--json`` summary)."""

    run: str
    steps: int  # train.max_steps
    resumed_from: int  # the checkpoint step this run started from (0: a fresh run)
    processes: int
    final_loss: float | None
    skipped_samples: dict[str, int] | None = None  # by reason; known when training ran in this process
    already_finished: bool = False  # the run was at train.max_steps already: nothing trained
    eval: dict[str, dict[str, Any]] | None = None  # eval.task's metrics on the final checkpoint: {task: …}
    eval_out: str | None = None  # where that eval wrote its answers and report (RUN/eval/TASK)
    trainable_params: int | None = None  # known when training ran in this process
    total_params: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.already_finished:
            del data["already_finished"]
        if self.eval is None:
            del data["eval"], data["eval_out"]
        return data


def run_training(
    cfg: TrainRunConfig, progress: StepProgress | None = None, launch: LaunchOptions | None = None
) -> TrainSummary:
    """Validate, lock the run, pick the resume point, train (here or through the launcher).

    ``mgpt4 pretrain`` (``cfg.stage`` 1) and ``mgpt4 finetune`` (stage 2). A run already at
    ``train.max_steps`` trains nothing and returns its summary with ``already_finished``. With
    ``eval.task`` the final checkpoint is then evaluated (``mgpt4.train.final_eval``), also when the run
    had finished before (the eval resumes, or redoes nothing), and the summary holds its metrics.

    Args:
        cfg: the resolved config.
        progress: gets every step's metrics record when training runs in this process (the launched
            processes of ``--gpus N`` show their own progress).
        launch: process count and machines; None = one process here.

    Raises:
        ConfigError / UsageError (exit 2): before anything is written or started; Mgpt4Error: the
            launched processes failed, or the final eval did (the checkpoint is saved).
    """
    launch = launch or LaunchOptions()
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
        command = "pretrain" if cfg.stage == 1 else "finetune"
        header = f"mgpt4 {command} --config {run / 'config.yaml'}"
        # The judge's API key stays in the environment or the recipe, never in the run directory.
        saved = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, judge=dataclasses.replace(
            cfg.eval.judge, key=None)))  # fmt: skip
        config_path = save_config(saved, run / "config.yaml", header=header)
        if not launch.distributed:
            from mgpt4.train.engine import run_worker

            result = run_worker(cfg, plan.folder, progress)
            summary = _summary(run, cfg, plan.step, launch)
            summary.final_loss = result["final_loss"]
            summary.skipped_samples = result["skipped_samples"]
            summary.trainable_params = result["trainable_params"]
            summary.total_params = result["total_params"]
        else:
            # The launcher and workers log to stdout (DeepSpeed's default); send that to our stderr (fd 2)
            # so that stdout holds only the summary (--json).
            env = {**os.environ, WATCH_PID_ENV: str(os.getpid())}
            command_line = launcher_command(launch, config_path, plan.folder)
            launched = subprocess.run(command_line, stdout=2, env=env, check=False)
            if launched.returncode != 0:
                raise Mgpt4Error(
                    f"training processes exited with code {launched.returncode}; see the log above"
                )
            summary = _summary(run, cfg, plan.step, launch)
        final = checkpoints_dir(run) / f"step-{cfg.train.max_steps}"
        return _with_final_eval(summary, cfg, run, final, cfg.train.max_steps)


def _with_final_eval(summary: TrainSummary, cfg: TrainRunConfig, run: Path, checkpoint: Path,
                     step: int) -> TrainSummary:  # fmt: skip
    if cfg.eval.task is None:
        return summary
    from mgpt4.train.final_eval import run_final_eval

    summary.eval, summary.eval_out = run_final_eval(cfg, run, checkpoint, step)
    return summary


def _summary(run: Path, cfg: TrainRunConfig, resumed_from: int, launch: LaunchOptions,
             already_finished: bool = False) -> TrainSummary:  # fmt: skip
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]  # eval lines hold none
    return TrainSummary(
        run=str(run), steps=cfg.train.max_steps, resumed_from=resumed_from,
        processes=launch.gpus * (launch.num_nodes or 1), final_loss=losses[-1] if losses else None,
        already_finished=already_finished,
    )  # fmt: skip


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
    command += ["--module", WORKER_MODULE, "--config", str(config_path)]
    return command + (["--resume", str(resume)] if resume is not None else [])


def free_port() -> int:
    """A TCP port that is free on this machine now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_when_gone(pid: int) -> None:
    """Start a daemon thread that ends this (launched) process as soon as process ``pid`` has ended.

    DeepSpeed's launcher does not stop its workers when its own parent dies; a worker that outlives
    the ``mgpt4`` command would keep training into a run directory nobody holds.
    """

    def gone() -> None:
        os.write(2, f"error: the mgpt4 process {pid} that started this run has ended; stopping\n".encode())
        os._exit(1)  # from a thread: no cleanup that could still write checkpoints or metrics

    def watch() -> None:
        try:
            # Linux >= 5.3: a pidfd turns readable when that very process ends (no pid-reuse race).
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            gone()
        except (AttributeError, OSError):  # macOS, old kernels: poll
            while _alive(pid):
                time.sleep(0.5)
            gone()
        select.select([handle], [], [])
        gone()

    threading.Thread(target=watch, name="mgpt4-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
