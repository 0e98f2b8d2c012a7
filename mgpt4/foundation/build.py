"""Build the micro foundation models reproducibly, write them with a manifest, and check a rebuild.

One thread and deterministic algorithms make a CPU build bitwise repeatable on the same torch build
and CPU. The manifest records the settings, a digest of every shipped tensor and *trajectory*
digests of the weights after the first steps of each pretraining, so a test can rerun those steps
(seconds) instead of the whole build (minutes) and still fail if the code or data changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mgpt4.config import from_dict, to_dict
from mgpt4.errors import CheckpointError
from mgpt4.foundation import PRESET
from mgpt4.foundation.language import LanguagePretrainConfig, pretrain_language
from mgpt4.foundation.vision import VisionPretrainConfig, pretrain_vision
from mgpt4.model.checkpoints import read_state_dict, resolve_path, save_weights
from mgpt4.model.presets import get_preset

log = logging.getLogger("mgpt4.foundation")

MANIFEST = "manifest.json"
VISION_FILE = "vision.safetensors"
LLM_DIR = "llm"
TRAJECTORY_STEPS = (1, 10)  # digests recorded after these steps of each pretraining


@dataclasses.dataclass
class FoundationConfig:
    """Both pretrainings."""

    vision: VisionPretrainConfig = dataclasses.field(default_factory=VisionPretrainConfig)
    language: LanguagePretrainConfig = dataclasses.field(default_factory=LanguagePretrainConfig)


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (independent of the file format)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One thread and deterministic kernels for the duration (the caller's settings come back)."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


class _Trajectory:
    """Collects the digests at `TRAJECTORY_STEPS` and reports progress."""

    def __init__(self, name: str, total: int, progress: Callable[[str, int, int, float], None] | None):
        self.name, self.total, self.progress = name, total, progress
        self.digests: dict[str, str] = {}

    def __call__(self, step: int, module: torch.nn.Module, loss: float) -> None:
        if step in TRAJECTORY_STEPS:
            self.digests[str(step)] = tensor_digest(module.state_dict())
        if self.progress is not None:
            self.progress(self.name, step, self.total, loss)


def build_foundation(
    out: str | Path,
    cfg: FoundationConfig | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Pretrain both micro models and write ``vision.safetensors``, ``llm/`` and ``manifest.json``.

    Args:
        out: output folder (created; files are replaced).
        cfg: the settings (default: the shipped models').
        progress: called after every step with (model name, step, total steps, loss).

    Returns:
        The manifest.
    """
    cfg = cfg or FoundationConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(PRESET)
    with deterministic():
        started = time.monotonic()
        vision_track = _Trajectory("vision", cfg.vision.steps, progress)
        vision = pretrain_vision(cfg.vision, preset, vision_track)
        vision_seconds = time.monotonic() - started
        started = time.monotonic()
        language_track = _Trajectory("language", cfg.language.steps, progress)
        llm, tokenizer = pretrain_language(cfg.language, preset, language_track)
        language_seconds = time.monotonic() - started
    save_weights(vision, out / VISION_FILE)
    llm.save_pretrained(str(out / LLM_DIR))
    tokenizer.save_pretrained(str(out / LLM_DIR))
    manifest = {
        "preset": PRESET,
        "config": to_dict(cfg),
        "torch": torch.__version__,
        "vision": {"file": VISION_FILE, "digest": tensor_digest(vision), "trajectory": vision_track.digests,
                   "seconds": round(vision_seconds, 1)},
        "language": {"folder": LLM_DIR, "digest": tensor_digest(llm.state_dict()),
                     "trajectory": language_track.digests, "seconds": round(language_seconds, 1)},
    }  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a built (or the shipped, ``mgpt4:foundation/micro``) folder."""
    path = resolve_path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; rebuild with `python -m mgpt4.foundation build --out DIR`")
    return json.loads(path.read_text())


def shipped_digests(folder: str | Path) -> dict[str, str]:
    """Digests of the tensors actually in a built folder: ``vision`` and ``language``."""
    root = resolve_path(folder)
    manifest = read_manifest(root)
    vision = read_state_dict(root / manifest["vision"]["file"])
    language = read_state_dict(root / manifest["language"]["folder"] / "model.safetensors")
    return {"vision": tensor_digest(vision), "language": tensor_digest(language)}


def rebuild_trajectory(folder: str | Path, steps: int = max(TRAJECTORY_STEPS)) -> dict[str, dict[str, str]]:
    """Rerun the first ``steps`` of both pretrainings with a folder's recorded settings.

    Returns:
        ``{"vision": {step: digest}, "language": {step: digest}}`` for the recorded steps ≤ ``steps``;
        equal to the manifest's trajectories when this code built the folder.
    """
    manifest = read_manifest(folder)
    cfg = from_dict(FoundationConfig, manifest["config"])
    preset = get_preset(manifest["preset"])
    with deterministic():
        vision_track = _Trajectory("vision", steps, None)
        pretrain_vision(cfg.vision, preset, vision_track, stop_after=steps)
        language_track = _Trajectory("language", steps, None)
        pretrain_language(cfg.language, preset, language_track, stop_after=steps)
    return {"vision": vision_track.digests, "language": language_track.digests}


def check_folder(folder: str | Path) -> list[str]:
    """Problems found in ``folder`` (empty when its files are what this code builds).

    Its tensors must match the manifest's digests, and rerunning the first ``TRAJECTORY_STEPS`` of both
    pretrainings from the manifest's settings must give the digests recorded during the build.
    """
    manifest = read_manifest(folder)
    problems = []
    for name, digest in shipped_digests(folder).items():
        if digest != manifest[name]["digest"]:
            problems.append(f"{name}: the files' tensors differ from the manifest's digest")
    for name, digests in rebuild_trajectory(folder).items():
        if digests != manifest[name]["trajectory"]:
            problems.append(f"{name}: rebuilding steps {list(TRAJECTORY_STEPS)} gives other weights")
    return problems
