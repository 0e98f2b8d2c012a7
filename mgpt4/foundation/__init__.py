"""Micro foundation models: a ViT pretrained on shapes images and an LLM pretrained on text, shipped.

MiniGPT-4's claim is that one linear layer aligns a *frozen, separately pretrained* vision encoder
with a *frozen, separately pretrained* LLM. The official encoders (EVA ViT-g, Vicuna) are far too big
for a CPU demo, so the project builds micro stand-ins of the ``micro-patches`` preset's shape and
ships them inside the package (a few MB):

- ``vision.safetensors``: the micro EVA ViT (timm ``Eva`` key names, loadable with
  ``model.vision_weights`` like ``eva_vit_g.pth``), pretrained on shapes images *without captions*:
  per-patch heads predict the colour, shape and grid position of the object under each patch, and a
  pooled head the number of objects. The heads are discarded; ``ln_vision`` keeps its identity init,
  as in the official Llama-2 MiniGPT-4, which loads no BLIP-2 weights.
- ``llm/``: the micro Llama (HF folder with the project's micro tokenizer, loadable with
  ``model.llm_path``), pretrained on caption and chat-template text *without images*. See
  `language` for what stands in the image slot.

``manifest.json`` records the build settings, a digest of every shipped tensor and digests of the
weights after the first few steps, so a test can rebuild those steps and prove the files come from
this code. ``python -m mgpt4.foundation build --out DIR`` rebuilds them (bitwise on the same torch
build and CPU: one thread, deterministic algorithms).
"""

from __future__ import annotations

# Configs name the shipped files through the package scheme (`mgpt4.model.checkpoints.resolve_path`).
VISION_WEIGHTS = "mgpt4:foundation/micro/vision.safetensors"
LLM_PATH = "mgpt4:foundation/micro/llm"
SHIPPED_DIR = "mgpt4:foundation/micro"
PRESET = "micro-patches"  # the shape both models are built in
