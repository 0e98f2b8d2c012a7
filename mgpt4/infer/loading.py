"""Load a ready-to-run model from command-line arguments (shared by describe, chat and curate).

``--model`` names either a saved model folder (a run directory or ``checkpoints/step-N``) or a
preset, which is then built from the official files given with ``--vision/--qformer/--proj/--llm``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from mgpt4.config import ModelConfig
from mgpt4.errors import UsageError
from mgpt4.model.build import build_model, load_model_dir, resolve_dtype, weight_sources
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import PRESETS, get_preset

log = logging.getLogger("mgpt4.infer")


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed to torch.

    Raises:
        UsageError: an unknown device string, or ``cuda`` without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: '{name}' is not a torch device (use auto, cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def split_model_source(source: str) -> tuple[str | None, str | None]:
    """Split ``--model`` into (model folder, preset name); exactly one of them is set.

    Raises:
        UsageError: neither an existing folder nor a preset name.
    """
    if source in PRESETS:
        return None, source
    if Path(source).is_dir():
        return source, None
    raise UsageError(
        f"--model {source}: not a run directory, checkpoint folder or preset ({', '.join(PRESETS)})"
    )


def load_model(model_cfg: ModelConfig, checkpoint: str | None = None, device: str = "auto") -> MiniGPT4:
    """A model in eval mode on ``device``: from a saved folder, or built from ``model_cfg``'s preset.

    Args:
        model_cfg: preset, official weight paths and dtype (``auto``: bf16 on CUDA, fp32 on CPU).
        checkpoint: a run directory or checkpoint folder; its saved config then decides the model,
            and only ``model_cfg.dtype`` is used.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        UsageError: official-weight paths given together with a checkpoint; bad device.
        CheckpointError: a weight file is missing or does not fit.
    """
    torch_device = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, torch_device)
    if checkpoint is not None:
        given = [name for name, value in _weight_paths(model_cfg).items() if value]
        if given:
            raise UsageError(
                f"{', '.join(given)} apply to a preset; {checkpoint} already names its weights in config.yaml"
            )
        model = load_model_dir(
            checkpoint, device=torch_device, dtype=model_cfg.dtype, quantize=model_cfg.quantize
        )
        log.info("loaded %s (%s) on %s, %s", checkpoint, model.preset.name, torch_device, _dtype_name(dtype))
        return model
    cfg = dataclasses.replace(model_cfg, grad_checkpointing=False)
    random_parts = [name for name, value in _weight_paths(cfg).items() if not value and name != "--proj"]
    if random_parts and not get_preset(cfg.preset).from_scratch:
        log.warning(
            "preset %s without %s: those parts have random weights", cfg.preset, ", ".join(random_parts)
        )
    model = build_model(cfg, device=torch_device).eval()
    log.info("built preset %s on %s, %s", cfg.preset, torch_device, _dtype_name(dtype))
    return model


def _weight_paths(cfg: ModelConfig) -> dict[str, str | None]:
    """``weight_sources`` named by the CLI options that set them (``--vision`` …)."""
    return {f"--{group}": path for group, path in weight_sources(cfg).items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
