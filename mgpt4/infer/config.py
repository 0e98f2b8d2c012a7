"""The configs of ``mgpt4 describe`` and ``mgpt4 chat`` (light: the CLI builds its options from them)."""

from __future__ import annotations

import dataclasses

from mgpt4.config import GenerateConfig, ModelConfig, field
from mgpt4.conversation import IMAGE_PLACEHOLDER
from mgpt4.errors import UsageError


@dataclasses.dataclass
class DescribeConfig:
    """``mgpt4 describe``: what to describe, with which model, how to decode and where to write."""

    inputs: list[str] = field(
        default_factory=list, doc="images, folders (recursive), globs, .tar shards or shard brace patterns"
    )
    checkpoint: str | None = field(None, doc="run directory or checkpoint folder; None = build `model`")
    model: ModelConfig = field(default_factory=ModelConfig, doc="preset and official weights (no checkpoint)")
    generate: GenerateConfig = field(default_factory=GenerateConfig, doc="decoding; greedy by default")
    prompt: str | None = field(
        None, doc="instruction (wrapped in the stage-2 template); None = 'Describe this image in detail.'"
    )
    batch_size: int = field(8, doc="images per generate call (left padding, per-row stop)")
    device: str = field("auto", doc="auto (cuda when present), cpu, cuda, cuda:N")
    output: str | None = field(None, doc="also write the JSONL to this file (atomically)")
    json: bool = field(False, doc="show JSONL (image, prompt, text, tokens, seconds) on stdout")
    quiet: bool = field(False, doc="no progress or info on stderr")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.prompt is not None and self.prompt.count(IMAGE_PLACEHOLDER) > 1:
            raise UsageError(f"prompt: at most one {IMAGE_PLACEHOLDER} (describe shows one image per prompt)")


@dataclasses.dataclass
class ChatGenerateConfig(GenerateConfig):
    """Chat decoding: the official demo samples (MG ``answer_prepare`` hard-codes ``do_sample=True``;
    top_p 0.9, temperature 1.0, repetition_penalty 1.05 are the shared defaults)."""

    do_sample: bool = field(True, doc="sample like the official demo; false = greedy")


@dataclasses.dataclass
class ChatConfig:
    """``mgpt4 chat``: the model, the first image, decoding, and an optional transcript to resume."""

    image: str | None = field(None, doc="image to talk about first (`/image PATH` switches later)")
    checkpoint: str | None = field(None, doc="run directory or checkpoint folder; None = build `model`")
    model: ModelConfig = field(default_factory=ModelConfig, doc="preset and official weights (no checkpoint)")
    generate: ChatGenerateConfig = field(
        default_factory=ChatGenerateConfig, doc="decoding; official demo sampling"
    )
    load: str | None = field(None, doc="resume a transcript written by /save")
    device: str = field("auto", doc="auto (cuda when present), cpu, cuda, cuda:N")
    stream: bool = field(True, doc="show tokens as they are generated")
    json: bool = field(False, doc="one JSON line per answer on stdout (question, answer, tokens, seconds)")
