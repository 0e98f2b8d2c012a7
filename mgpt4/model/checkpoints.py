"""Weight files: the official LAVIS / MiniGPT-4 checkpoints and our own trainable-only safetensors.

One checker per format: from headers only (safetensors header, or a ``.pth`` memory-mapped), every
expected tensor present with the right shape and nothing unknown left over — a mismatch is a
``CheckpointError`` naming the file and key. ``fill`` then moves each checked tensor into the model,
cast and on its device, one at a time. Loading never executes code: ``.pth`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


class SafetensorsState(Mapping):
    """A ``.safetensors`` file as a lazy mapping: keys and shapes from its header, tensors on access."""

    def __init__(self, path: Path) -> None:
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def tensor_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """Shape of ``state[key]`` without reading its data (header of a lazy file, or an mmap'd tensor)."""
    return state.shape(key) if isinstance(state, SafetensorsState) else tuple(state[key].shape)


def open_state(path: str | Path, what: str = "proj") -> Mapping[str, torch.Tensor]:
    """A weight file's tensors without reading their data: safetensors header, or a ``.pth`` mmap'd.

    ``.pth`` files go through ``torch.load(mmap=True, weights_only=True)``: the pickle holds only
    names and offsets, so tensors stay on disk until used and unused ones (EVA's 40th block) are
    never read. Wrapped dicts (``{"model": ...}``) are unwrapped.

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
            return SafetensorsState(path)
        # mmap needs torch's zip format (torch >= 1.6); older pickles are read whole, still weights-only.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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


def read_state_dict(path: str | Path, what: str = "proj") -> dict[str, torch.Tensor]:
    """All tensors of a (small) weight file in memory; see ``open_state`` for the errors."""
    state = open_state(path, what)
    try:
        return {key: state[key] for key in state}
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from exc


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


# --------------------------------------------------------------------------------------------------
# checking a file against the model, then filling the model one tensor at a time
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckedWeights:
    """A weight file whose keys and shapes fit the model: model key → key in ``state``."""

    path: Path
    state: Mapping[str, torch.Tensor]
    keys: dict[str, str]

    def __len__(self) -> int:
        return len(self.keys)

    def tensor(self, model_key: str) -> torch.Tensor:
        return self.state[self.keys[model_key]]


def shapes_of(module: nn.Module | nn.Parameter, prefix: str) -> dict[str, tuple[int, ...]]:
    """``prefix``-qualified key → shape for a module's state dict (or one parameter): meta works too."""
    if isinstance(module, nn.Parameter):
        return {prefix: tuple(module.shape)}
    return {f"{prefix}.{key}": tuple(value.shape) for key, value in module.state_dict().items()}


def check_weights(
    path: Path,
    state: Mapping[str, torch.Tensor],
    keys: dict[str, str],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
) -> CheckedWeights:
    """Every expected model key present once, nothing unknown, every shape equal — from headers only.

    Args:
        keys: model key → file key, for the file's keys that are not ignored.
        expected: model key → shape.

    Raises:
        CheckpointError: names the file and the first offending key, with counts.
    """
    unexpected = sorted(set(keys) - set(expected))
    missing = sorted(set(expected) - set(keys))
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected key(s), e.g. '{keys[unexpected[0]]}' — not {what}?"
        )
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s), e.g. '{missing[0]}' — not {what}?")
    for model_key, file_key in keys.items():
        shape = tensor_shape(state, file_key)
        if shape != tuple(expected[model_key]):
            raise CheckpointError(
                f"{path}: '{file_key}' has shape {shape}, the model needs {tuple(expected[model_key])} "
                "— weights for a different model size?"
            )
    return CheckedWeights(path, state, keys)


def fill(
    model: nn.Module,
    weights: CheckedWeights,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Put each checked tensor into ``model`` (meta or real), cast and moved one tensor at a time.

    Peak extra memory is one tensor: nothing is built first in fp32 and copied over.
    ``device``/``dtype`` default to those of the tensor being replaced (unless it is on meta).
    """
    for model_key in weights.keys:
        owner_name, _, name = model_key.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = owner._parameters.get(name, owner._buffers.get(name))
        target_device = device or (old.device if old.device.type != "meta" else "cpu")
        target_dtype = (dtype or old.dtype) if old.is_floating_point() else old.dtype
        try:
            value = weights.tensor(model_key).to(device=target_device, dtype=target_dtype)
        except (RuntimeError, SafetensorError) as exc:  # a tensor whose bytes cannot be read
            raise CheckpointError(f"{weights.path}: cannot read '{model_key}' ({_first_line(exc)})") from exc
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            owner._buffers[name] = value


# --------------------------------------------------------------------------------------------------
# official formats
# --------------------------------------------------------------------------------------------------


def check_eva_vit(path: str | Path, expected: Mapping[str, tuple[int, ...]]) -> CheckedWeights:
    """LAVIS ``eva_vit_g.pth`` against ``visual_encoder.*`` shapes (timm Eva; key names already match).

    EVA-CLIP-g has 40 blocks and MiniGPT-4 builds 39, loading non-strictly; we leave blocks past our
    depth unread and check everything else strictly.
    """
    path = Path(path)
    state = open_state(path, "vision")
    depth = 1 + max(
        (int(k.split(".")[2]) for k in expected if k.startswith("visual_encoder.blocks.")), default=-1
    )
    dropped = [k for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth]
    if dropped:
        log.info(
            "%s: ignoring %d keys of blocks past depth %d (official behaviour)", path, len(dropped), depth
        )
    keys = {f"visual_encoder.{k}": k for k in state if k not in set(dropped)}
    return check_weights(path, state, keys, expected, "an EVA ViT file")


def load_eva_vit(model: nn.Module, path: str | Path) -> None:
    """``eva_vit_g.pth`` → ``model.visual_encoder`` (keeps its device and dtype)."""
    fill(model, check_eva_vit(path, shapes_of(model.visual_encoder, "visual_encoder")))


def blip2_to_ours(key: str) -> str:
    """Map one LAVIS BLIP-2 key to our module names (HF ``Blip2QFormerModel`` under ``Qformer``)."""
    key = key.replace("Qformer.bert.embeddings.LayerNorm.", "Qformer.layernorm.")
    key = key.replace("Qformer.bert.", "Qformer.")
    return key.replace(".attention.self.", ".attention.attention.").replace(
        ".crossattention.self.", ".crossattention.attention."
    )


def blip2_expected(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """What a BLIP-2 file fills: ``Qformer.*``, ``ln_vision.*`` and ``query_tokens``."""
    return {
        **shapes_of(model.Qformer, "Qformer"),
        **shapes_of(model.ln_vision, "ln_vision"),
        **shapes_of(model.query_tokens, "query_tokens"),
    }


def check_blip2(path: str | Path, expected: Mapping[str, tuple[int, ...]]) -> CheckedWeights:
    """BLIP-2 ``blip2_pretrained_flant5xxl.pth`` (LAVIS names) — or our own names — against
    ``blip2_expected`` shapes; the text branch, T5 side and buffers are ignored."""
    path = Path(path)
    state = open_state(path, "qformer")
    ignored = [k for k in state if _BLIP2_IGNORED.match(k)]
    log.info("%s: ignoring %d keys MiniGPT-4 does not use (text branch, T5, buffers)", path, len(ignored))
    keys = {blip2_to_ours(k): k for k in state if not _BLIP2_IGNORED.match(k)}
    return check_weights(path, state, keys, expected, "a BLIP-2 file")


def load_blip2(model: nn.Module, path: str | Path) -> None:
    """BLIP-2 ``blip2_pretrained_flant5xxl.pth`` → ``Qformer``, ``query_tokens`` and ``ln_vision``."""
    path = Path(path)
    if model.Qformer is None:
        raise CheckpointError(no_qformer_message(path, model.preset.name))
    fill(model, check_blip2(path, blip2_expected(model)))


def no_qformer_message(path: Path, preset: str) -> str:
    return (
        f"{path}: preset {preset} has no Q-Former (the official Llama-2 MiniGPT-4 loads no BLIP-2 "
        "weights); leave model.qformer_weights empty"
    )


def check_projection(path: str | Path, expected: Mapping[str, tuple[int, ...]]) -> CheckedWeights:
    """``llama_proj`` from MiniGPT-4's ``pretrained_minigpt4*.pth`` (``{"model": {...}}``) or our file.

    Official files may carry extra buffers; only ``llama_proj.*`` is taken, and it must be complete.
    """
    path = Path(path)
    state = open_state(path, "proj")
    keys = {k: k for k in state if k.startswith("llama_proj.")}
    if not keys:
        raise CheckpointError(f"{path}: no 'llama_proj.*' keys — not a MiniGPT-4 projection checkpoint")
    return check_weights(path, state, keys, expected, "a MiniGPT-4 projection checkpoint")


def load_projection(model: nn.Module, path: str | Path) -> None:
    """``pretrained_minigpt4*.pth`` → ``model.llama_proj``."""
    fill(model, check_projection(path, shapes_of(model.llama_proj, "llama_proj")))


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
    # Parameters and buffers by name, without building a state dict of a (possibly quantized) LLM.
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [k for k in state if k not in own or (is_allowed is not None and not is_allowed(k))]
    if unknown:
        raise CheckpointError(
            f"{path}: '{unknown[0]}' is not a weight of this model ({len(unknown)} such keys)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)} "
                "— weights for a different model size?"
            )
    with torch.no_grad():  # in place: an optimizer may already hold these parameters
        for key, value in state.items():
            own[key].copy_(value)
    return sorted(state)
