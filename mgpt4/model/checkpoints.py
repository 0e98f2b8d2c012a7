"""Weight files: the official LAVIS / MiniGPT-4 checkpoints and our own trainable-only safetensors.

One loader per format. Every loader checks that each tensor it expects arrives with the right shape
and that nothing unknown is left over: a mismatch is a ``CheckpointError`` naming the file and key.
Loading never executes code: ``.pth`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mgpt4.errors import CheckpointError

log = logging.getLogger("mgpt4.model")

TRAINABLE_FILE = "trainable.safetensors"

# A weight path starting with this names a file shipped inside the installed package, e.g.
# ``mgpt4:foundation/micro/llm`` (the pretrained micro encoders): configs that use it stay valid
# wherever the package is installed.
PACKAGE_SCHEME = "mgpt4:"

# Where the official files come from (named in "file not found" errors).
OFFICIAL_SOURCES = {
    "vision": "eva_vit_g.pth from the LAVIS BLIP2 model zoo",
    "qformer": "blip2_pretrained_flant5xxl.pth from the LAVIS BLIP2 model zoo",
    "proj": "pretrained_minigpt4*.pth from the MiniGPT-4 README (stage-1/2 checkpoints)",
}

# BLIP-2 checkpoint keys MiniGPT-4 does not use: the Q-Former's text branch (deleted by MG),
# the T5 side of blip2_pretrained_flant5xxl, and buffers the LAVIS runner saves.
_BLIP2_IGNORED = re.compile(
    r"^(t5_proj\.|t5_model\.|llm_proj\.|opt_proj\.|visual_encoder\.|Qformer\.cls\.|"
    r"Qformer\.bert\.embeddings\.(position_ids|word_embeddings\.|position_embeddings\.)|"
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def resolve_path(value: str | Path) -> Path:
    """A weight path as given, or ``mgpt4:RELATIVE`` → that file inside the installed package."""
    text = str(value)
    if text.startswith(PACKAGE_SCHEME):
        return Path(str(resources.files("mgpt4").joinpath(text[len(PACKAGE_SCHEME) :])))
    return Path(text)


def read_state_dict(path: str | Path, what: str = "proj") -> dict[str, torch.Tensor]:
    """Read a flat or wrapped state dict from ``.safetensors`` or a weights-only ``.pth``.

    Raises:
        CheckpointError: missing file, a pickle that holds code or objects, truncated/corrupt data.
    """
    path = Path(path)
    if not path.is_file():
        source = OFFICIAL_SOURCES.get(what, "")
        raise CheckpointError(
            f"{path}: weight file not found" + (f" (official file: {source})" if source else "")
        )
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load — the pickle holds objects other than tensors, and loading weights "
            "never runs code; re-save it as a plain state dict or safetensors"
        ) from exc
    except (RuntimeError, EOFError, SafetensorError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({_first_line(exc)})"
        ) from exc
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    # LAVIS saves {"model": ...}; other trainers use "state_dict" / "module".
    while isinstance(state, Mapping) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in ("model", "state_dict", "module") if k in state), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path, prefix: str = "") -> None:
    """Copy ``state`` into ``module``: every key present, none unknown, every shape equal.

    Raises:
        CheckpointError: names the first offending key, with counts.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} key(s) for {prefix or 'model'}, e.g. '{missing[0]}' "
            "— wrong file?"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected key(s), e.g. '{unexpected[0]}' — wrong file?"
        )
    _check_shapes(expected, state, source)
    module.load_state_dict(dict(state), strict=True)


def _check_shapes(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: Path
) -> None:
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[key].shape)} — weights for a different model size?"
            )


# --------------------------------------------------------------------------------------------------
# official formats
# --------------------------------------------------------------------------------------------------


def load_eva_vit(model: nn.Module, path: str | Path) -> None:
    """LAVIS ``eva_vit_g.pth`` → ``model.visual_encoder`` (timm Eva; key names already match).

    EVA-CLIP-g has 40 blocks and MiniGPT-4 builds 39, loading non-strictly; we drop blocks past our
    depth explicitly and load everything else strictly.
    """
    path = Path(path)
    state = read_state_dict(path, "vision")
    depth = len(model.visual_encoder.blocks)
    dropped = [k for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth]
    if dropped:
        log.info(
            "%s: ignoring %d keys of blocks past depth %d (official behaviour)", path, len(dropped), depth
        )
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    load_exact(model.visual_encoder, state, path, "visual_encoder")


def blip2_to_ours(key: str) -> str:
    """Map one LAVIS BLIP-2 key to our module names (HF ``Blip2QFormerModel`` under ``Qformer``)."""
    key = key.replace("Qformer.bert.embeddings.LayerNorm.", "Qformer.layernorm.")
    key = key.replace("Qformer.bert.", "Qformer.")
    return key.replace(".attention.self.", ".attention.attention.").replace(
        ".crossattention.self.", ".crossattention.attention."
    )


def load_blip2(model: nn.Module, path: str | Path) -> None:
    """BLIP-2 ``blip2_pretrained_flant5xxl.pth`` → ``Qformer``, ``query_tokens`` and ``ln_vision``."""
    path = Path(path)
    if model.Qformer is None:
        raise CheckpointError(
            f"{path}: preset {model.preset.name} has no Q-Former (the official Llama-2 MiniGPT-4 loads no "
            "BLIP-2 weights); leave model.qformer_weights empty"
        )
    state = read_state_dict(path, "qformer")
    ignored = [k for k in state if _BLIP2_IGNORED.match(k)]
    mapped = {blip2_to_ours(k): v for k, v in state.items() if not _BLIP2_IGNORED.match(k)}
    log.info("%s: ignoring %d keys MiniGPT-4 does not use (text branch, T5, buffers)", path, len(ignored))
    targets = {"Qformer.": model.Qformer, "ln_vision.": model.ln_vision}
    expected_keys = {f"{prefix}{k}" for prefix, part in targets.items() for k in part.state_dict()}
    expected_keys.add("query_tokens")
    unexpected = sorted(set(mapped) - expected_keys)
    missing = sorted(expected_keys - set(mapped))
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected key(s), e.g. '{unexpected[0]}' — not a BLIP-2 file?"
        )
    if missing:
        raise CheckpointError(
            f"{path}: missing {len(missing)} key(s), e.g. '{missing[0]}' — not a BLIP-2 file?"
        )
    for prefix, part in targets.items():
        load_exact(
            part, {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}, path, prefix
        )
    _check_shapes({"query_tokens": model.query_tokens}, {"query_tokens": mapped["query_tokens"]}, path)
    with torch.no_grad():
        model.query_tokens.copy_(mapped["query_tokens"])


def load_projection(model: nn.Module, path: str | Path) -> None:
    """``llama_proj`` from MiniGPT-4's ``pretrained_minigpt4*.pth`` (``{"model": {...}}``) or our file.

    Official files may carry extra buffers; only ``llama_proj.*`` is taken, and it must be complete.
    """
    path = Path(path)
    state = read_state_dict(path, "proj")
    proj = {k[len("llama_proj.") :]: v for k, v in state.items() if k.startswith("llama_proj.")}
    if not proj:
        raise CheckpointError(f"{path}: no 'llama_proj.*' keys — not a MiniGPT-4 projection checkpoint")
    load_exact(model.llama_proj, proj, path, "llama_proj")


# --------------------------------------------------------------------------------------------------
# our format
# --------------------------------------------------------------------------------------------------


def save_weights(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write tensors as safetensors to a temp name, then rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


def load_weights(
    model: nn.Module, path: str | Path, is_allowed: Callable[[str], bool] | None = None
) -> list[str]:
    """Load our ``trainable.safetensors`` into ``model``: every key must exist with the same shape.

    Returns:
        The keys loaded.
    """
    path = Path(path)
    state = read_state_dict(path)
    own = model.state_dict()
    unknown = [k for k in state if k not in own or (is_allowed is not None and not is_allowed(k))]
    if unknown:
        raise CheckpointError(
            f"{path}: '{unknown[0]}' is not a weight of this model ({len(unknown)} such keys)"
        )
    _check_shapes(own, state, path)
    model.load_state_dict(state, strict=False)
    return sorted(state)
