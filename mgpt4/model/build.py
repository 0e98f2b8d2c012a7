"""Assemble a ``MiniGPT4`` from a ``ModelConfig``, and save / reload it as a self-describing folder.

A saved model folder (a run's ``checkpoints/step-N/``) holds ``config.yaml`` (the resolved config),
``trainable.safetensors`` and, when the LLM has no local directory, ``tokenizer/``. Together with the
official files named in the config that is everything needed to rebuild the model.

What ``trainable.safetensors`` holds: the trainable weights, plus any module that came from random
init rather than a file (e.g. a micro ViT) — otherwise a reloaded model would get different random
weights than the ones it was trained with. With the official files in place it is just ``llama_proj``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mgpt4.config import ModelConfig, from_dict, read_yaml_file, save_config
from mgpt4.errors import CheckpointError, UsageError
from mgpt4.model import checkpoints
from mgpt4.model.llm import inspect_llm_dir, load_llm, quantization_config
from mgpt4.model.minigpt4 import TRAINABLE_GROUPS, MiniGPT4
from mgpt4.model.presets import LLMSpec, Preset, get_preset
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


def _random_llm_config(preset: Preset, tokenizer: PreTrainedTokenizerBase, attn: str) -> LlamaConfig:
    vocab = len(tokenizer) if preset.from_scratch else max(preset.llm.vocab_size, len(tokenizer))
    config = llama_config(preset.llm, vocab, attn)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def weight_sources(cfg: ModelConfig) -> dict[str, str | None]:
    """Which file each trainable group's initial weights come from (None = random init)."""
    return {
        "vision": cfg.vision_weights,
        "qformer": cfg.qformer_weights,
        "proj": cfg.proj_weights,
        "llm": cfg.llm_path,
    }


def check_weight_files(cfg: ModelConfig, meta: MiniGPT4) -> dict[str, checkpoints.CheckedWeights]:
    """Check the vision / BLIP-2 / projection files against the model's shapes, from headers only.

    Returns:
        file group → its checked weights (model key → file key), ready for ``checkpoints.fill``.
    """
    checked = {}
    if cfg.vision_weights:
        expected = checkpoints.shapes_of(meta.visual_encoder, "visual_encoder")
        checked["vision"] = checkpoints.check_eva_vit(cfg.vision_weights, expected)
    if cfg.qformer_weights:
        if meta.Qformer is None:
            raise CheckpointError(checkpoints.no_qformer_message(Path(cfg.qformer_weights), cfg.preset))
        checked["qformer"] = checkpoints.check_blip2(cfg.qformer_weights, checkpoints.blip2_expected(meta))
    if cfg.proj_weights:
        expected = checkpoints.shapes_of(meta.llama_proj, "llama_proj")
        checked["proj"] = checkpoints.check_projection(cfg.proj_weights, expected)
    return checked


def _check_quantize(cfg: ModelConfig, dtype: torch.dtype) -> None:
    quantization_config(cfg.quantize, dtype)  # unknown mode / extra not installed
    if cfg.quantize == "none":
        return
    if not cfg.llm_path:
        raise UsageError(
            f"model.quantize={cfg.quantize} applies to an LLM loaded from model.llm_path (--llm)"
        )
    if "llm" in cfg.trainable:
        raise UsageError(
            f"model.quantize={cfg.quantize}: a quantized LLM cannot train; drop 'llm' from trainable"
        )


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    tokenizer_dir: Path | None = None,
    trainable_dtype: torch.dtype | None = None,
) -> MiniGPT4:
    """Build ``cfg``'s model on ``device`` in ``cfg.dtype``: preset shapes, official files, trainable set.

    Every weight file is checked from its headers before anything big is allocated. Parts filled
    from files are created without memory and receive each tensor already cast and on ``device``;
    the LLM streams from its memory-mapped files (quantized if ``cfg.quantize``). Random parts of a
    micro preset are made on the CPU in fp32 as always (the same random weights as before), those
    of an official preset directly on ``device`` in ``cfg.dtype``.

    Args:
        trainable_dtype: dtype of the parameters that train (training: fp32 master weights);
            None = ``cfg.dtype`` like everything else.

    Raises:
        UsageError: unknown preset, trainable group or quantize mode.
        CheckpointError: any weight file problem.
    """
    preset = get_preset(cfg.preset)
    cfg = _with_package_paths(cfg)
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    _check_quantize(cfg, dtype)
    llm_folder = None
    if cfg.llm_path:
        llm_folder = inspect_llm_dir(cfg.llm_path, None if preset.from_scratch else preset.llm.hidden_size)
        tokenizer = load_tokenizer(tokenizer_dir or llm_folder.path)
        llm_config = llm_folder.config  # sizes the meta skeleton; load_llm sets the attention kernel
    else:
        tokenizer = (
            load_tokenizer(tokenizer_dir) if tokenizer_dir else build_micro_tokenizer(preset.llm.vocab_size)
        )
        llm_config = _random_llm_config(preset, tokenizer, cfg.attn_implementation)
    with torch.device("meta"):
        meta = MiniGPT4(preset, LlamaForCausalLM(llm_config))
    checked = check_weight_files(cfg, meta)

    # Random LLM first, then the tower: the order in which micro models always drew their random init.
    if llm_folder is None:
        with _random_init(preset, device, dtype):
            llm = LlamaForCausalLM(llm_config)
        llm.to(device=device, dtype=dtype)
    else:
        llm = meta.llama_model  # placeholder until the tower is in place
    from_files = {part for group in checked for part in _FILLED_PARTS[group]}

    def part_init(name: str):
        return (
            init_empty_weights(include_buffers=False)
            if name in from_files
            else _random_init(preset, device, dtype)
        )

    model = MiniGPT4(preset, llm, tokenizer, max_txt_len=cfg.max_txt_len, part_init=part_init)
    for weights in checked.values():
        checkpoints.fill(model, weights, device, dtype)
    for name in _FILLED_PARTS["vision"] + _FILLED_PARTS["qformer"] + _FILLED_PARTS["proj"]:
        part = getattr(model, name)
        if isinstance(part, nn.Module):  # random parts, and the buffers of filled ones (EVA's zero k_bias)
            part.to(device=device, dtype=dtype)
        elif part is not None and name not in from_files:
            part.data = part.data.to(device=device, dtype=dtype)
    # The LLM last: its load is the biggest allocation, and the tower's file mappings are gone by then.
    if llm_folder is not None:
        model.llama_model = load_llm(llm_folder, dtype, device, cfg.attn_implementation, cfg.quantize)
    model.set_trainable(cfg.trainable)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if trainable_dtype is not None:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(trainable_dtype)
    left = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if left is not None:
        raise CheckpointError(f"{cfg.preset}: '{left}' received no weights (a bug: please report it)")
    return model


# Top-level parts each file group fills (ln_vision comes from the BLIP-2 file, as in MG).
_FILLED_PARTS = {
    "vision": ("visual_encoder",),
    "qformer": ("Qformer", "query_tokens", "ln_vision"),
    "proj": ("llama_proj",),
}


@contextlib.contextmanager
def _random_init(preset: Preset, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Where random weights are drawn: micro on the CPU in fp32 (cast afterwards, reproducible as
    before); an official preset (a benchmark or a missing file) right on ``device`` in ``dtype``."""
    if preset.from_scratch:
        yield
        return
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


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
    weights = {}
    for name in (name for group in groups for name in TRAINABLE_GROUPS[group]):
        part = getattr(model, name)
        if isinstance(part, nn.Parameter):
            weights[name] = part.detach()
        elif part is not None:  # per part: never the state dict of a frozen (maybe quantized) LLM
            weights |= {f"{name}.{k}": v for k, v in part.state_dict().items()}
    return weights


def save_model_dir(model: MiniGPT4, cfg: ModelConfig, folder: str | Path, header: str | None = None) -> Path:
    """Write ``trainable.safetensors``, ``config.yaml`` (model section) and a built ``tokenizer/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.save_weights(weights_to_save(model, cfg), folder / checkpoints.TRAINABLE_FILE)
    if not cfg.llm_path:
        model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_model_config(cfg, folder, header)
    return folder


@dataclasses.dataclass
class _ModelFile:
    model: ModelConfig


CHECKPOINT_MANIFEST = "manifest.json"  # written last into a training step folder (mgpt4.train.manifest)


def write_model_config(cfg: ModelConfig, folder: str | Path, header: str | None = None) -> Path:
    """``folder/config.yaml`` holding just the ``model`` section."""
    return save_config(_ModelFile(model=cfg), Path(folder) / "config.yaml", header=header)


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory (→ its newest finished checkpoint) or a folder holding trainable weights.

    A run's step folder counts as finished once it has its manifest; ``checkpoints/latest`` is only
    followed for runs saved before manifests existed.

    Raises:
        UsageError: the path holds neither.
    """
    path = Path(path)
    checkpoints_dir = path / "checkpoints"
    if checkpoints_dir.is_dir():
        steps = [p for p in checkpoints_dir.glob("step-*") if p.name.split("-", 1)[1].isdigit()]
        finished = [p for p in steps if (p / CHECKPOINT_MANIFEST).is_file()]
        latest = checkpoints_dir / "latest"
        if finished:
            path = max(finished, key=lambda p: int(p.name.split("-", 1)[1]))
        elif latest.exists():
            name = latest.read_text().strip() if latest.is_file() else latest.resolve().name
            path = checkpoints_dir / name
    if not (path / checkpoints.TRAINABLE_FILE).is_file():
        raise UsageError(
            f"{path}: not a model folder (no {checkpoints.TRAINABLE_FILE}); pass a run directory or "
            "checkpoints/step-N"
        )
    return path


def read_model_config(folder: str | Path) -> ModelConfig:
    """The ``model`` section of a saved folder's ``config.yaml``.

    A relative weight path that exists inside the folder is taken from there (an imported model
    folder names its own files, so it can be moved); other relative paths stay as written.
    """
    folder = Path(folder)
    file = folder / "config.yaml"
    if not file.is_file():
        raise UsageError(f"{file}: missing — a model folder needs its config.yaml")
    data = read_yaml_file(file)  # one-line ConfigError naming the file (bad YAML, a !!python tag, …)
    cfg = from_dict(ModelConfig, data.get("model", {}), "model.")
    paths = {}
    for name in ("vision_weights", "qformer_weights", "proj_weights", "llm_path"):
        value = getattr(cfg, name)
        if value and not Path(value).is_absolute() and (folder / value).exists():
            paths[name] = str(folder / value)
    return dataclasses.replace(cfg, **paths)


def load_model_dir(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    quantize: str | None = None,
) -> MiniGPT4:
    """Rebuild a saved model on ``device``: preset + official files from its config + our saved weights.

    Args:
        dtype, quantize: override the folder's ``model.dtype`` / ``model.quantize`` (None: keep).
    """
    folder = resolve_model_dir(path)
    cfg = read_model_config(folder)
    cfg = dataclasses.replace(
        cfg,
        proj_weights=None,
        grad_checkpointing=False,
        dtype=dtype or cfg.dtype,
        quantize=quantize or cfg.quantize,
    )
    tokenizer_dir = folder / "tokenizer"
    model = build_model(cfg, device=device, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
    checkpoints.load_weights(model, folder / checkpoints.TRAINABLE_FILE)
    return model.eval()
