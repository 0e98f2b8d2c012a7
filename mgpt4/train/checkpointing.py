"""Checkpoints for exact resume: ``checkpoints/step-N/``, complete or absent, plus a ``latest`` hint.

A step folder holds what ``describe``/``chat``/``finetune --init`` need (``trainable.safetensors``,
``config.yaml``, ``tokenizer/`` — via ``save_model_dir``), DeepSpeed's optimizer/scheduler state
(frozen weights excluded: they come back from their files), each rank's data-stream and RNG state, and
``manifest.json`` (sizes and hashes, ``mgpt4.train.manifest``). Every rank writes into
``step-N.partial/``; rank 0 adds the manifest and renames the folder, so a kill at any moment leaves
either a whole checkpoint or a ``.partial`` one that the next run removes (``mgpt4.train.resume``).

Loading DeepSpeed's pickled state never runs code: every file goes through
``torch.load(weights_only=True)`` with only DeepSpeed's own small state classes allowed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.errors import CheckpointError, ConfigError
from mgpt4.model.build import save_model_dir
from mgpt4.model.checkpoints import TRAINABLE_FILE, load_weights
from mgpt4.train import manifest
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.resume import PARTIAL_SUFFIX, checkpoints_dir, move_aside, step_folders

log = logging.getLogger("mgpt4.train")

DEEPSPEED_TAG = "deepspeed"


def _rng_state() -> dict[str, Any]:
    # Training draws randomness from Python (instruction choice lives in the batch stream) and torch.
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(engine, model, cfg: TrainRunConfig, run: Path, step: int, batches, rank: int) -> Path:
    """Write ``checkpoints/step-N`` on every rank, then (rank 0) the manifest, ``latest`` and pruning."""
    final = checkpoints_dir(run) / f"step-{step}"
    folder = final.with_name(final.name + PARTIAL_SUFFIX)
    with _gathered(model, cfg):  # a collective under ZeRO-3: every rank enters it
        if rank == 0:
            save_model_dir(model, cfg.model, folder, header=f"mgpt4 describe --model {final}")
    engine.save_checkpoint(
        str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, client_state={"step": step}
    )
    state = {"step": step, "data": batches.state_dict(), "rng": _rng_state()}
    tmp = folder / f"state_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / f"state_rank{rank}.json")
    dist.barrier()
    if rank == 0:
        manifest.write_manifest(folder, step, dist.get_world_size())
        if final.exists():  # only if something appeared during the run: keep it rather than overwrite
            log.warning("%s already exists; kept it as %s", final, move_aside(final).name)
        folder.rename(final)
        marker = checkpoints_dir(run) / "latest.tmp"
        marker.write_text(final.name + "\n")
        marker.replace(checkpoints_dir(run) / "latest")
        _prune(run, cfg.train.keep_last)
    dist.barrier()
    return final


def _gathered(model, cfg: TrainRunConfig):
    """Under ZeRO-3 parameters are partitioned: gather them while saving."""
    if "zero3" not in cfg.train.zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _prune(run: Path, keep_last: int) -> None:
    for old in step_folders(run)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed old checkpoint %s (keep_last=%d)", old, keep_last)


def restore_weights(model, folder: Path) -> None:
    """Load a step's saved weights (incl. randomly initialised frozen parts) before DeepSpeed starts."""
    load_weights(model, folder / TRAINABLE_FILE)


def restore_state(engine, folder: Path, batches, rank: int) -> int:
    """Load DeepSpeed (weights only), data and RNG state; returns the step to continue from.

    Raises:
        CheckpointError: a state file holds objects other than tensors and DeepSpeed's state types,
            or cannot be read.
    """
    if engine.load_universal_checkpoint():
        # DeepSpeed reads universal checkpoints with torch.load(weights_only=False) (zero/stage3.py).
        raise ConfigError(
            "train.zero: the DeepSpeed config sets checkpoint.load_universal; mgpt4 resumes only its own "
            "checkpoints, which load without unpickling code"
        )
    engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    try:
        loaded, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False)
    finally:
        engine.checkpoint_engine = engine.checkpoint_engine.inner
    if loaded is None:
        raise CheckpointError(f"{folder / DEEPSPEED_TAG}: DeepSpeed found no state to load")
    state = json.loads((folder / f"state_rank{rank}.json").read_text())
    batches.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return int(state["step"])


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with every ``load`` done as ``torch.load(weights_only=True)``.

    DeepSpeed reads all of its regular (non-universal) checkpoint files through
    ``engine.checkpoint_engine.load``, whose torch implementation passes ``weights_only=False``.
    Saving and everything else go to the wrapped engine unchanged.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_deepspeed_state_types()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused — the pickle holds objects other than tensors and DeepSpeed state, and "
                "loading it could run code; this run directory was altered, do not resume it"
            ) from exc
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable DeepSpeed state ({str(exc).splitlines()[0]})") from exc


def _deepspeed_state_types() -> list[type]:
    types = []
    for name in manifest.DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        types.append(getattr(importlib.import_module(module), attr))
    return types
