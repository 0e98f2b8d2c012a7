"""Random weights in the official file formats, at any preset's shape (for benchmarks, GPU checks, tests).

No model hub is reachable from CI or the benchmark machines, so the loading path is exercised on files
that have the official names, layouts and dtypes but random values:

- ``eva_vit_g.pth``: a bare dict under LAVIS EVA names, fp16, **with** the 40th block that MiniGPT-4
  ignores (OFFICIAL.md §1);
- ``blip2_pretrained_flant5xxl.pth``: ``{"model": ...}`` under LAVIS names, fp32, with the text-branch and
  ``t5_proj`` keys MiniGPT-4 ignores (§2);
- ``pretrained_minigpt4*.pth``: ``{"model": {"llama_proj.weight", "llama_proj.bias"}}`` (§3);
- an HF Llama folder: ``config.json``, sharded ``model-0000i-of-0000n.safetensors`` + index, tokenizer.

The LLM is written one shard at a time, so writing a 7B folder needs about one shard of memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from mgpt4.model.build import llama_config
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import Preset, get_preset
from mgpt4.model.tokenizer import build_micro_tokenizer

# bert-base-uncased sizes of the Q-Former text branch MiniGPT-4 drops (only their presence matters).
_BERT_VOCAB, _BERT_POSITIONS = 30522, 512
_FLAN_T5_XXL_WIDTH = 4096  # t5_proj: Linear(768 → 4096) in blip2_pretrained_flant5xxl


def official_file_names(preset: Preset) -> dict[str, str]:
    """The file names the official releases use for ``preset``."""
    proj = {"vicuna-13b": "pretrained_minigpt4.pth", "llama2-7b": "pretrained_minigpt4_llama2_7b.pth"}
    return {
        "vision": "eva_vit_g.pth",
        "qformer": "blip2_pretrained_flant5xxl.pth",
        "proj": proj.get(preset.name, "pretrained_minigpt4_7b.pth"),
        "llm": "llm",
    }


def write_official_files(
    preset_name: str,
    folder: str | Path,
    *,
    seed: int = 0,
    llm_dtype: torch.dtype = torch.bfloat16,
    vision_dtype: torch.dtype = torch.float16,
    shard_bytes: int = 2 * 10**9,
    tokenizer_vocab: int = 1024,
) -> dict[str, Path]:
    """Write random official-format files for ``preset_name`` into ``folder``.

    Returns:
        ``{"vision", "qformer", "proj", "llm"}`` → path (``qformer`` absent for presets without one).
    """
    preset = get_preset(preset_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = official_file_names(preset)
    tokenizer = build_micro_tokenizer(tokenizer_vocab)
    vocab = len(tokenizer) if preset.from_scratch else max(preset.llm.vocab_size, len(tokenizer))
    config = llama_config(preset.llm, vocab, "sdpa")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        meta = MiniGPT4(preset, LlamaForCausalLM(config))
    generator = torch.Generator().manual_seed(seed)
    paths = {"vision": folder / names["vision"], "proj": folder / names["proj"], "llm": folder / names["llm"]}

    vision = _shapes(meta.visual_encoder.state_dict())
    depth = preset.vision.depth
    vision |= {  # EVA-CLIP-g's 40th block, present in the file and ignored by MiniGPT-4
        re.sub(r"^blocks\.0\.", f"blocks.{depth}.", key): shape
        for key, shape in vision.items()
        if key.startswith("blocks.0.")
    }
    torch.save(_random_state(vision, vision_dtype, generator), paths["vision"])

    if meta.Qformer is not None:
        paths["qformer"] = folder / names["qformer"]
        shapes = {ours_to_blip2(f"Qformer.{k}"): v for k, v in _shapes(meta.Qformer.state_dict()).items()}
        shapes |= {f"ln_vision.{k}": v for k, v in _shapes(meta.ln_vision.state_dict()).items()}
        shapes["query_tokens"] = tuple(meta.query_tokens.shape)
        shapes |= _blip2_unused_shapes(preset)
        state = _random_state(shapes, torch.float32, generator)
        state["Qformer.bert.embeddings.position_ids"] = torch.arange(_BERT_POSITIONS)[None]
        torch.save({"model": state}, paths["qformer"])

    proj = {f"llama_proj.{k}": v for k, v in _shapes(meta.llama_proj.state_dict()).items()}
    torch.save({"model": _random_state(proj, torch.float32, generator)}, paths["proj"])

    write_llm_folder(paths["llm"], config, meta.llama_model, generator, llm_dtype, shard_bytes)
    tokenizer.save_pretrained(str(paths["llm"]))
    return paths


def ours_to_blip2(key: str) -> str:
    """Our Q-Former key (``Qformer.*`` on HF ``Blip2QFormerModel``) → its LAVIS BLIP-2 name (§2)."""
    key = key.replace("Qformer.layernorm.", "Qformer.embeddings.LayerNorm.")
    key = key.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self."
    )
    return key.replace("Qformer.", "Qformer.bert.", 1)


def write_llm_folder(
    folder: Path,
    config,
    meta_llm: torch.nn.Module,
    generator: torch.Generator,
    dtype: torch.dtype,
    shard_bytes: int,
) -> None:
    """An HF Llama folder with random weights, written one safetensors shard at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    shapes = _shapes(meta_llm.state_dict())
    shards = list(_split_shards(shapes, dtype.itemsize, shard_bytes))
    weight_map, total = {}, 0
    for index, keys in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = _random_state({k: shapes[k] for k in keys}, dtype, generator)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(keys, name)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _split_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> Iterator[list[str]]:
    shard, size = [], 0
    for key, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if shard and size + nbytes > shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(key)
        size += nbytes
    if shard:
        yield shard


def _blip2_unused_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Keys of blip2_pretrained_flant5xxl.pth that MiniGPT-4 does not use: text FFN, embeddings, t5_proj."""
    spec = preset.qformer
    h, i = spec.hidden_size, spec.intermediate_size
    shapes = {
        "Qformer.bert.embeddings.word_embeddings.weight": (_BERT_VOCAB, h),
        "Qformer.bert.embeddings.position_embeddings.weight": (_BERT_POSITIONS, h),
        "Qformer.cls.predictions.bias": (_BERT_VOCAB,),
        "t5_proj.weight": (_FLAN_T5_XXL_WIDTH, h),
        "t5_proj.bias": (_FLAN_T5_XXL_WIDTH,),
    }
    for n in range(spec.num_layers):
        layer = f"Qformer.bert.encoder.layer.{n}."
        shapes |= {
            f"{layer}intermediate.dense.weight": (i, h),
            f"{layer}intermediate.dense.bias": (i,),
            f"{layer}output.dense.weight": (h, i),
            f"{layer}output.dense.bias": (h,),
            f"{layer}output.LayerNorm.weight": (h,),
            f"{layer}output.LayerNorm.bias": (h,),
        }
    return shapes


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _random_state(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """N(0, 0.02) matrices, ones for norm weights, small biases: finite activations at any depth."""
    state = {}
    for key, shape in shapes.items():
        if re.search(r"(norm[^.]*|LayerNorm|ln_vision)\.weight$", key):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        state[key] = tensor.to(dtype)
    return state
