"""``model import``: the official files → one self-contained model folder that never reads a pickle.

    FOLDER/
      config.yaml            model section naming the folder's own files (relative: the folder can move)
      vision.safetensors     EVA ViT (LAVIS names, the file's dtype; the unused 40th block left out)
      qformer.safetensors    Q-Former, query_tokens, ln_vision (our names; text branch and T5 left out)
      trainable.safetensors  llama_proj — the trainable part, as in every saved model folder
      llm/                   the LLM folder: safetensors shards hard-linked (or copied), ``.bin`` shards
                             re-saved as safetensors; config and tokenizer files copied

Every key is checked once, from the files' headers, before anything is written; the folder is
written under a temporary name and renamed when complete. Loading it (``load_model_dir``) takes the
same low-memory path as the official files, minus the pickle parsing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from mgpt4.config import ModelConfig
from mgpt4.errors import CheckpointError, UsageError
from mgpt4.model import checkpoints
from mgpt4.model.build import check_weight_files, write_model_config
from mgpt4.model.import_config import ImportConfig, ImportResult
from mgpt4.model.llm import _IGNORABLE_KEYS, inspect_llm_dir
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import get_preset

log = logging.getLogger("mgpt4.model")

VISION_FILE = "vision.safetensors"
QFORMER_FILE = "qformer.safetensors"
LLM_DIR = "llm"
_LLM_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def run_import(cfg: ImportConfig, progress: Callable[[str], None] | None = None) -> ImportResult:
    """``mgpt4 model import``: check every required setting, then ``import_model``.

    Raises:
        UsageError: a required file or the output folder is not given (and what ``import_model`` raises).
    """
    missing = [f"--{name}" for name in ("preset", "vision", "proj", "llm", "out") if not getattr(cfg, name)]
    if missing:
        raise UsageError(f"model import: give {', '.join(missing)}")
    out = import_model(cfg.preset, cfg.vision, cfg.qformer, cfg.proj, cfg.llm, cfg.out, progress)
    return ImportResult(str(out), cfg.preset)


def import_model(
    preset: str,
    vision: str | Path,
    qformer: str | Path | None,
    proj: str | Path,
    llm: str | Path,
    out: str | Path,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Check the official files against ``preset`` and write them as one model folder ``out``.

    Args:
        qformer: the BLIP-2 file; None (or "") for a preset without a Q-Former (llama2-7b).
        progress: called with a short note before each file is written.

    Raises:
        UsageError: ``out`` exists and is not empty, a file the preset needs is not given;
        CheckpointError: any file missing, unreadable, of the wrong keys or shapes.
    """
    spec = get_preset(preset)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not empty; choose a new folder")
    qformer = qformer or None
    if spec.qformer is not None and qformer is None:
        raise UsageError(
            f"preset {preset} has a Q-Former: give its BLIP-2 file (blip2_pretrained_flant5xxl.pth)"
        )
    cfg = ModelConfig(
        preset=preset,
        vision_weights=str(vision),
        qformer_weights=str(qformer) if qformer else None,
        proj_weights=str(proj),
        llm_path=str(llm),
    )
    note = progress or (lambda text: None)
    # Every key of every file, once, from headers: nothing is written when one is wrong.
    llm_folder = inspect_llm_dir(llm, None if spec.from_scratch else spec.llm.hidden_size)
    with torch.device("meta"):
        meta = MiniGPT4(spec, LlamaForCausalLM(llm_folder.config))
    checked = check_weight_files(cfg, meta)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    note(f"vision tower → {VISION_FILE}")
    _save(checked["vision"], partial / VISION_FILE, strip="visual_encoder.")
    if "qformer" in checked:
        note(f"Q-Former → {QFORMER_FILE}")
        _save(checked["qformer"], partial / QFORMER_FILE)
    note(f"projection → {checkpoints.TRAINABLE_FILE}")
    _save(checked["proj"], partial / checkpoints.TRAINABLE_FILE)
    note(f"LLM → {LLM_DIR}/")
    _import_llm(llm_folder.path, llm_folder.weight_files, partial / LLM_DIR)
    model_cfg = dataclasses.replace(
        cfg,
        vision_weights=VISION_FILE,
        qformer_weights=QFORMER_FILE if "qformer" in checked else None,
        proj_weights=None,
        llm_path=LLM_DIR,
        grad_checkpointing=False,
    )
    sources = ", ".join(str(p) for p in (vision, qformer, proj, llm) if p)
    write_model_config(model_cfg, partial, header=f"mgpt4 model import of {sources}")
    if out.exists():  # an empty folder the user made
        _move_into(partial, out)
    else:
        partial.replace(out)
    log.info("imported %s into %s", preset, out)
    return out


def _move_into(partial: Path, out: Path) -> None:
    """``out`` exists (empty): move the finished files in, then drop the temporary folder."""
    for item in partial.iterdir():
        item.replace(out / item.name)
    partial.rmdir()


def _save(weights: checkpoints.CheckedWeights, path: Path, strip: str = "") -> None:
    """Write checked weights as safetensors in their stored dtype (``strip``: prefix removed from keys)."""
    tensors = {}
    for model_key in weights.keys:
        key = model_key[len(strip) :] if strip and model_key.startswith(strip) else model_key
        tensors[key] = weights.tensor(model_key).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _import_llm(source: Path, weight_files: tuple[Path, ...], target: Path) -> None:
    """Link or copy safetensors shards; re-save ``.bin`` shards as safetensors; copy the other files."""
    target.mkdir()
    skip = {file.name for file in weight_files} | set(_LLM_WEIGHT_NAMES)
    for item in source.iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith((".bin", ".safetensors")):
            shutil.copy2(item, target / item.name)
    if all(file.suffix == ".safetensors" for file in weight_files):
        for file in weight_files:
            _link_or_copy(file, target / file.name)
        index = source / "model.safetensors.index.json"
        if index.is_file():
            shutil.copy2(index, target / index.name)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for number, file in enumerate(weight_files, start=1):
        name = f"model-{number:05d}-of-{len(weight_files):05d}.safetensors"
        state = checkpoints.open_state(file)
        tensors = _unshared({k: v for k, v in state.items() if not k.endswith(_IGNORABLE_KEYS)})
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del state, tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights in a pickle): give repeats a copy."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = tensor.contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        result[key] = tensor.clone() if ident in seen else tensor
        seen.add(ident)
    return result


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk; across file systems (or where links are refused) copy instead."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    if not target.is_file():
        raise CheckpointError(f"{target}: could not be written from {source}")
