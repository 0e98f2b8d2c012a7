"""The frozen LLM from a local HF folder: checked from its headers first, then loaded in place.

``inspect_llm_dir`` reads only ``config.json`` and the weight files' headers (safetensors) or pickle
indexes (``.bin``, weights-only and memory-mapped), so a missing shard, a truncated file, a pickle that
holds code, or an LLM of the wrong size is a one-line error before any weight is allocated.

``load_llm`` then lets transformers build the model on the meta device and stream each tensor
from the memory-mapped files straight into its compute dtype on its device (``device_map``), optionally
quantized by bitsandbytes while loading — never an fp32 copy on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mgpt4.errors import CheckpointError, UsageError

log = logging.getLogger("mgpt4.model")

QUANTIZE_MODES = ("none", "int8", "nf4")
QUANT_INSTALL = "pip install -e '.[quant]'"

# HF saves these next to the weights; an old Vicuna conversion may also carry rotary buffers.
_IGNORABLE_KEYS = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class LLMFolder:
    """What ``inspect_llm_dir`` found: the config and the weight files, all readable."""

    path: Path
    config: LlamaConfig
    weight_files: tuple[Path, ...]

    @property
    def pickle_only(self) -> bool:
        return all(file.suffix == ".bin" for file in self.weight_files)


def inspect_llm_dir(path: str | Path, hidden_size: int | None = None) -> LLMFolder:
    """Check an LLM folder without loading weights: config, every shard's header, keys and shapes.

    Args:
        hidden_size: the width the preset needs (None: any).

    Raises:
        CheckpointError: no config.json, no weights, a missing/truncated shard, a pickle holding code,
            a missing or mis-shaped key; UsageError: an LLM of another width than the preset's.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json — model.llm_path must be a local HF model directory")
    try:
        config = LlamaConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: not a readable model config ({exc})") from exc
    if hidden_size is not None and config.hidden_size != hidden_size:
        raise UsageError(
            f"{config_file}: hidden_size {config.hidden_size}, but the preset's projection needs "
            f"{hidden_size} — pick the preset of this LLM's size (`mgpt4 model info`)"
        )
    files = _weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes |= _header_shapes(file)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(
            f"{path}: the weight files lack {len(missing)} tensor(s) of this config, e.g. '{missing[0]}' "
            "— an incomplete download?"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise CheckpointError(
                f"{path}: '{key}' has shape {shapes[key]}, config.json implies {shape} — mixed-up files?"
            )
    return LLMFolder(path, config, tuple(files))


def _weight_files(path: Path) -> list[Path]:
    """The shards named by an index, else the single file: safetensors preferred over ``.bin``."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a readable shard index ({exc})") from exc
            missing = [name for name in names if not (path / name).is_file()]
            if missing:
                raise CheckpointError(f"{path / missing[0]}: shard named in {index_name} is missing")
            return [path / name for name in names]
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(
        f"{path}: no model.safetensors, pytorch_model.bin or shard index — not an HF model directory"
    )


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, or from a ``.bin`` opened weights-only and mmap'd."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated? ({exc})") from exc
    if not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"{file}: a legacy (pre-zip) pickle that cannot be memory-mapped; re-save the LLM as "
            "safetensors (e.g. `mgpt4 model import`, or save_pretrained with a recent transformers)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to load — the pickle holds objects other than tensors, and loading weights "
            "never runs code; convert the LLM to safetensors from a trusted copy"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable checkpoint, truncated or corrupt ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    return {
        k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v) and not k.endswith(_IGNORABLE_KEYS)
    }


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for ``model.quantize`` (None for ``none``).

    int8 is LLM.int8() as in the official demo's ``low_resource`` mode (MG ``load_in_8bit=True``);
    nf4 is 4-bit NormalFloat with double quantization as in QLoRA, computing in ``compute_dtype``.

    Raises:
        UsageError: an unknown mode, or bitsandbytes not installed (names the install command).
    """
    if quantize not in QUANTIZE_MODES:
        raise UsageError(f"model.quantize: '{quantize}' is not one of {', '.join(QUANTIZE_MODES)}")
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"model.quantize={quantize} needs bitsandbytes: {QUANT_INSTALL}")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        # LLM.int8() multiplies in fp16 whatever the activations are, and says so on every call.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_fp16_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _drop_fp16_cast_notice(record: logging.LogRecord) -> bool:
    return "will be cast" not in record.getMessage()


def load_llm(
    folder: LLMFolder,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "sdpa",
    quantize: str = "none",
) -> LlamaForCausalLM:
    """Load a checked LLM folder straight into ``dtype`` on ``device`` (quantized if asked).

    ``.bin`` shards are read by transformers with ``weights_only=True`` (and memory-mapped); a pickle
    holding code was already refused by ``inspect_llm_dir``.

    Raises:
        CheckpointError: transformers cannot load the folder.
    """
    quant = quantization_config(quantize, dtype)
    if folder.pickle_only:
        log.info(
            "%s: pickle weights (read weights-only); `model import` re-saves them as safetensors", folder.path
        )
    try:
        with _quiet_transformers():
            llm = LlamaForCausalLM.from_pretrained(
                str(folder.path),
                local_files_only=True,
                attn_implementation=attn_implementation,
                dtype=dtype,
                device_map={"": device},
                quantization_config=quant,
                weights_only=True,
            )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{folder.path}: cannot load the LLM ({_first_line(exc)})") from exc
    llm.eval()
    return llm


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers: library code does not print."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
