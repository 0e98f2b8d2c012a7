"""``ImportConfig``: what ``mgpt4 model import`` reads and writes (light: the CLI's options come from it)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mgpt4.config import field


@dataclasses.dataclass
class ImportConfig:
    """``mgpt4 model import``: the official files of one preset → one self-contained model folder."""

    preset: str | None = field(
        None, doc="the files' shape: vicuna-7b, vicuna-13b or llama2-7b (micro for tests)"
    )
    vision: str | None = field(None, doc="LAVIS eva_vit_g.pth (EVA ViT-g/14)")
    qformer: str | None = field(
        None,
        doc="BLIP-2 blip2_pretrained_flant5xxl.pth (Q-Former etc.); llama2-7b has none",
    )
    proj: str | None = field(None, doc="MiniGPT-4 pretrained_minigpt4*.pth (llama_proj)")
    llm: str | None = field(None, doc="local HF folder of Vicuna v0 / Llama-2-7b-chat")
    out: str | None = field(None, doc="the model folder to write (new, or an empty folder)")


@dataclasses.dataclass
class ImportResult:
    """Where the imported model is (``-m OUT`` or ``mgpt4 config set model OUT`` use it)."""

    out: str
    preset: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
