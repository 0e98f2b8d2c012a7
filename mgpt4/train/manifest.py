"""What a finished checkpoint holds, and the checks a resume makes before trusting one.

``checkpoints/step-N/manifest.json`` is written last, after every rank's files are on disk, and lists
each file with its size and SHA-256. A step folder is *intact* when the manifest is there and every
file it lists has that size and hash: a kill mid-save leaves no manifest, a truncated or altered file
fails its hash.

DeepSpeed stores its optimizer state as pickles. Nothing in them is unpickled unless every global the
pickle names is a tensor type or one of the four small DeepSpeed classes below; ``unsafe_globals``
checks that from the pickle's opcodes without running any of it (``torch.serialization``).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from mgpt4.errors import CheckpointError
from mgpt4.model.build import CHECKPOINT_MANIFEST

MANIFEST_VERSION = 1

# Every non-tensor type DeepSpeed 0.19 pickles into ZeRO 1/2/3 (+ offload, bf16, fp16) state files:
# read from the opcodes of the files it writes (torch.serialization.get_unsafe_globals_in_checkpoint)
# and from stage_1_and_2.py / stage3.py / bf16_optimizer.py ``state_dict`` (loss scaler, ZeRO stage,
# parameter-slice mappings). Constructing them runs no code beyond setting fields.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(folder: Path, step: int, world_size: int) -> Path:
    """List every file under ``folder`` with its size and hash, as ``manifest.json`` (written last)."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MANIFEST
    }
    manifest = {"version": MANIFEST_VERSION, "step": step, "world_size": world_size, "files": files}
    tmp = folder / (CHECKPOINT_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / CHECKPOINT_MANIFEST)
    return folder / CHECKPOINT_MANIFEST


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a step folder.

    Raises:
        CheckpointError: missing or malformed (the message says which).
    """
    path = folder / CHECKPOINT_MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"no {CHECKPOINT_MANIFEST} (its save never finished, or an older mgpt4 made it)"
        )
    try:
        manifest = json.loads(path.read_text())
        files, step, world_size = manifest["files"], int(manifest["step"]), int(manifest["world_size"])
        if not isinstance(files, dict) or world_size < 1:
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CheckpointError(f"{CHECKPOINT_MANIFEST} is unreadable ({exc})") from exc
    return {"files": files, "step": step, "world_size": world_size}


def verify(folder: Path) -> dict[str, Any]:
    """Check a step folder against its manifest; returns the manifest.

    Raises:
        CheckpointError: the first problem, as a short reason (a missing, short or altered file).
    """
    manifest = read_manifest(folder)
    if f"step-{manifest['step']}" != folder.name:
        raise CheckpointError(f"{CHECKPOINT_MANIFEST} is for step {manifest['step']}, not {folder.name}")
    needed = ["trainable.safetensors"] + [f"state_rank{r}.json" for r in range(manifest["world_size"])]
    for name in needed:
        if name not in manifest["files"]:
            raise CheckpointError(f"{CHECKPOINT_MANIFEST} does not list {name}")
    for name, expected in manifest["files"].items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{CHECKPOINT_MANIFEST} lists a path outside the folder: {name}")
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {expected.get('bytes')}")
        if _sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"{name} does not match its SHA-256 in the manifest (altered or damaged)")
    return manifest


def unsafe_globals(path: Path) -> list[str]:
    """Globals a pickled state file names beyond tensors and ``DEEPSPEED_SAFE_GLOBALS`` (nothing is run).

    Raises:
        CheckpointError: not a torch zip checkpoint (the only format DeepSpeed writes with torch >= 1.6).
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a torch checkpoint archive ({str(exc).splitlines()[0]})") from exc
    return sorted(set(found) - set(DEEPSPEED_SAFE_GLOBALS))


def check_pickles(folder: Path) -> None:
    """Refuse a step folder whose DeepSpeed state names anything that unpickling could run.

    Raises:
        CheckpointError: one line naming the file and the first foreign global.
    """
    for path in sorted(folder.rglob("*.pt")):
        foreign = unsafe_globals(path)
        if foreign:
            raise CheckpointError(
                f"{path}: refused — its pickle names {foreign[0]}, which is not a tensor or DeepSpeed state "
                "type, and loading it could run code; this run directory was altered, do not resume it"
            )
