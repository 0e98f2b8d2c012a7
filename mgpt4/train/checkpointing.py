"""Checkpoints for exact resume: ``checkpoints/step-N/`` + a ``latest`` marker written last.

A step folder holds what ``describe``/``chat``/``finetune --init`` need (``trainable.safetensors``,
``config.yaml``, ``tokenizer/`` — via ``save_model_dir``), DeepSpeed's optimizer/scheduler state
(frozen weights excluded: they come back from their files), and each rank's data-stream and RNG state.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.model.build import save_model_dir
from mgpt4.model.checkpoints import TRAINABLE_FILE, load_weights
from mgpt4.train.config import TrainRunConfig

log = logging.getLogger("mgpt4.train")

DEEPSPEED_TAG = "deepspeed"


def checkpoints_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest_step_dir(run: Path) -> Path | None:
    """The step folder ``checkpoints/latest`` names, if a complete checkpoint exists."""
    marker = checkpoints_dir(run) / "latest"
    if not marker.is_file():
        return None
    folder = checkpoints_dir(run) / marker.read_text().strip()
    return folder if (folder / TRAINABLE_FILE).is_file() else None


def _rng_state() -> dict[str, Any]:
    # Training draws randomness from Python (instruction choice lives in the batch stream) and torch.
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(engine, model, cfg: TrainRunConfig, run: Path, step: int, batches, rank: int) -> Path:
    """Write ``checkpoints/step-N`` on every rank, then (rank 0) ``latest`` and pruning."""
    folder = checkpoints_dir(run) / f"step-{step}"
    if rank == 0:
        with _gathered(model, cfg):
            save_model_dir(model, cfg.model, folder, header=f"mgpt4 describe --model {folder}")
    engine.save_checkpoint(
        str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, client_state={"step": step}
    )
    state = {"step": step, "data": batches.state_dict(), "rng": _rng_state()}
    tmp = folder / f"state_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / f"state_rank{rank}.json")
    dist.barrier()
    if rank == 0:
        marker = checkpoints_dir(run) / "latest.tmp"
        marker.write_text(folder.name + "\n")
        marker.replace(checkpoints_dir(run) / "latest")
        _prune(run, cfg.train.keep_last)
    dist.barrier()
    return folder


def _gathered(model, cfg: TrainRunConfig):
    """Under ZeRO-3 parameters are partitioned: gather them while saving."""
    if "zero3" not in cfg.train.zero:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _prune(run: Path, keep_last: int) -> None:
    steps = sorted(
        (p for p in checkpoints_dir(run).glob("step-*") if p.name.split("-")[1].isdigit()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed old checkpoint %s (keep_last=%d)", old, keep_last)


def restore_weights(model, folder: Path) -> None:
    """Load a step's saved weights (incl. randomly initialised frozen parts) before DeepSpeed starts."""
    load_weights(model, folder / TRAINABLE_FILE)


def restore_state(engine, folder: Path, batches, rank: int) -> int:
    """Load DeepSpeed, data and RNG state; returns the step to continue from."""
    engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False)
    state = json.loads((folder / f"state_rank{rank}.json").read_text())
    batches.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return int(state["step"])
