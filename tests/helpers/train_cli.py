"""Driving `mgpt4 pretrain`/`finetune` from tests: in this process (CliRunner) or as real processes."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from mgpt4.cli import cli

MGPT4 = str(Path(sys.executable).with_name("mgpt4"))
# Set by the in-process runs (engine._init_distributed); a child process must not join that group.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def stage1_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--config", "micro_stage1", f"data.shards=[{{path: {shards}}}]", f"out={out}",
        "data.micro_batch_size=4", "train.log_every=1", *extra,
    ]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_process_state():
    """(A module fixture.) One intra-op thread (a micro model loses a lot to thread contention on a shared
    CPU); afterwards leave no rendezvous variables behind for other test modules. The process group
    stays: DeepSpeed caches its groups, so later in-process runs reuse it."""
    saved = {name: os.environ.get(name) for name in DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
