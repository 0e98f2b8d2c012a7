"""``mgpt4 model info``: parameter counts and memory estimates, built on the meta device (no allocation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlamaForCausalLM

from mgpt4.model.build import llama_config
from mgpt4.model.minigpt4 import TRAINABLE_GROUPS, MiniGPT4
from mgpt4.model.presets import get_preset

GIB = 1024**3
# Training memory per trainable parameter with AdamW in mixed precision: bf16 weight (2) + fp32 master
# weight (4) + fp32 grad (4) + two fp32 Adam moments (8), as in DeepSpeed's ZeRO paper accounting.
TRAIN_BYTES_PER_TRAINABLE = 18
FROZEN_BYTES_PER_PARAM = 2  # frozen weights held in bf16/fp16


def build_meta_model(preset_name: str) -> MiniGPT4:
    """The full model on the meta device: shapes and counts without memory."""
    preset = get_preset(preset_name)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(preset.llm, preset.llm.vocab_size, "sdpa"))
        return MiniGPT4(preset, llm)


def model_summary(preset_name: str, trainable: Sequence[str] = ("proj",)) -> dict:
    """Per-module parameter counts, trainable vs frozen, and estimated memory (GiB)."""
    model = build_meta_model(preset_name)
    model.set_trainable(trainable)
    modules = []
    for group, names in TRAINABLE_GROUPS.items():
        for name in names:
            part = getattr(model, name)
            if part is None:
                continue
            count = (
                part.numel()
                if isinstance(part, torch.nn.Parameter)
                else sum(p.numel() for p in part.parameters())
            )
            modules.append({"module": name, "group": group, "params": count, "trainable": group in trainable})
    total = sum(m["params"] for m in modules)
    trained = sum(m["params"] for m in modules if m["trainable"])
    preset = model.preset
    return {
        "preset": preset.name,
        "description": preset.description,
        "image_tokens": preset.num_image_tokens,
        "modules": modules,
        "total_params": total,
        "trainable_params": trained,
        "frozen_params": total - trained,
        "memory_gib": {
            "inference_bf16": round(total * 2 / GIB, 2),
            "inference_fp32": round(total * 4 / GIB, 2),
            "train_bf16_adamw": round(
                ((total - trained) * FROZEN_BYTES_PER_PARAM + trained * TRAIN_BYTES_PER_TRAINABLE) / GIB, 2
            ),
        },
        "note": "weights and optimizer state only; activations come on top (less with grad checkpointing)",
    }
