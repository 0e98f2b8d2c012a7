"""Assemble a ``MiniGPT4`` from a ``ModelConfig``, and save / reload it as a self-describing folder.

A saved model folder (a run's ``checkpoints/step-N/``) holds ``config.yaml`` (the resolved config),
``trainable.safetensors`` and, when the LLM has no local directory, ``tokenizer/``. Together with the
official files named in the config that is everything needed to rebuild the model.

What ``trainable.safetensors`` holds: the trainable weights, plus any module that came from random
init rather than a file (e.g. a micro ViT) — otherwise a reloaded model would get different random
weights than the ones it was trained with. With the official files in place it is just ``llama_proj``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mgpt4.config import ModelConfig, from_dict, parse_yaml, save_config
from mgpt4.errors import CheckpointError, UsageError
from mgpt4.model import checkpoints
from mgpt4.model.minigpt4 import TRAINABLE_GROUPS, MiniGPT4
from mgpt4.model.presets import LLMSpec, get_preset
from mgpt4.model.tokenizer import build_micro_tokenizer, load_tokenizer

log = logging.getLogger("mgpt4.model")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA (fp16 if the GPU lacks bf16), fp32 on CPU."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UsageError(f"model.dtype: '{name}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def llama_config(spec: LLMSpec, vocab_size: int, attn_implementation: str) -> LlamaConfig:
    """A Llama config of the preset's shape (for random init or meta-device sizing)."""
    return LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def _build_llm(
    cfg: ModelConfig, tokenizer_dir: Path | None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    preset = get_preset(cfg.preset)
    if cfg.llm_path:
        path = Path(cfg.llm_path)
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path}: no config.json — model.llm_path must be a local HF model directory"
            )
        tokenizer = load_tokenizer(tokenizer_dir or path)
        try:
            llm = LlamaForCausalLM.from_pretrained(
                str(path),
                local_files_only=True,
                attn_implementation=cfg.attn_implementation,
                dtype=torch.float32,
            )
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load the LLM ({str(exc).splitlines()[0]})") from exc
        return llm, tokenizer
    tokenizer = (
        load_tokenizer(tokenizer_dir) if tokenizer_dir else build_micro_tokenizer(preset.llm.vocab_size)
    )
    vocab = len(tokenizer) if preset.from_scratch else max(preset.llm.vocab_size, len(tokenizer))
    config = llama_config(preset.llm, vocab, cfg.attn_implementation)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return LlamaForCausalLM(config), tokenizer


def weight_sources(cfg: ModelConfig) -> dict[str, str | None]:
    """Which file each trainable group's initial weights come from (None = random init)."""
    return {
        "vision": cfg.vision_weights,
        "qformer": cfg.qformer_weights,
        "proj": cfg.proj_weights,
        "llm": cfg.llm_path,
    }


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", tokenizer_dir: Path | None = None
) -> MiniGPT4:
    """Build the model of ``cfg``: preset shapes, official files where given, trainable groups set.

    Raises:
        UsageError: unknown preset or trainable group; CheckpointError: any weight file problem.
    """
    preset = get_preset(cfg.preset)
    cfg = _with_package_paths(cfg)
    llm, tokenizer = _build_llm(cfg, tokenizer_dir)
    model = MiniGPT4(preset, llm, tokenizer, max_txt_len=cfg.max_txt_len)
    if cfg.vision_weights:
        checkpoints.load_eva_vit(model, cfg.vision_weights)
    if cfg.qformer_weights:
        checkpoints.load_blip2(model, cfg.qformer_weights)
    if cfg.proj_weights:
        checkpoints.load_projection(model, cfg.proj_weights)
    model.set_trainable(cfg.trainable)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model.to(device=device, dtype=resolve_dtype(cfg.dtype, device))


def _with_package_paths(cfg: ModelConfig) -> ModelConfig:
    """``mgpt4:…`` weight paths resolved to the installed package's files (saved configs keep the name)."""
    names = ("vision_weights", "qformer_weights", "proj_weights", "llm_path")
    paths = {name: getattr(cfg, name) for name in names}
    resolved = {name: str(checkpoints.resolve_path(path)) for name, path in paths.items() if path}
    return dataclasses.replace(cfg, **resolved)


# --------------------------------------------------------------------------------------------------
# saved model folders
# --------------------------------------------------------------------------------------------------


def weights_to_save(model: MiniGPT4, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Trainable weights plus every group that was randomly initialised (see module docstring)."""
    sources = weight_sources(cfg)
    groups = [g for g in TRAINABLE_GROUPS if g in model.trainable_groups or g == "proj" or sources[g] is None]
    modules = {name for group in groups for name in TRAINABLE_GROUPS[group]}
    return {k: v for k, v in model.state_dict().items() if k.split(".")[0] in modules}


def save_model_dir(model: MiniGPT4, cfg: ModelConfig, folder: str | Path, header: str | None = None) -> Path:
    """Write ``trainable.safetensors``, ``config.yaml`` (model section) and a built ``tokenizer/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.save_weights(weights_to_save(model, cfg), folder / checkpoints.TRAINABLE_FILE)
    if not cfg.llm_path:
        model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    save_config(_ModelFile(model=cfg), folder / "config.yaml", header=header)
    return folder


@dataclasses.dataclass
class _ModelFile:
    model: ModelConfig


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory (→ its ``latest`` checkpoint) or a checkpoint folder holding trainable weights.

    Raises:
        UsageError: the path holds neither.
    """
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.exists():
        name = latest.read_text().strip() if latest.is_file() else latest.resolve().name
        path = path / "checkpoints" / name
    if not (path / checkpoints.TRAINABLE_FILE).is_file():
        raise UsageError(
            f"{path}: not a model folder (no {checkpoints.TRAINABLE_FILE}); pass a run directory or "
            "checkpoints/step-N"
        )
    return path


def read_model_config(folder: str | Path) -> ModelConfig:
    """The ``model`` section of a saved folder's ``config.yaml``."""
    file = Path(folder) / "config.yaml"
    if not file.is_file():
        raise UsageError(f"{file}: missing — a model folder needs its config.yaml")
    data = parse_yaml(file.read_text()) or {}
    return from_dict(ModelConfig, data.get("model", {}), "model.")


def load_model_dir(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> MiniGPT4:
    """Rebuild a saved model: preset + official files from its config + our saved weights."""
    folder = resolve_model_dir(path)
    cfg = read_model_config(folder)
    cfg = dataclasses.replace(cfg, proj_weights=None, grad_checkpointing=False, dtype=dtype or cfg.dtype)
    tokenizer_dir = folder / "tokenizer"
    model = build_model(cfg, device="cpu", tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
    checkpoints.load_weights(model, folder / checkpoints.TRAINABLE_FILE)
    model.eval()
    return model.to(device=device, dtype=resolve_dtype(cfg.dtype, device))
