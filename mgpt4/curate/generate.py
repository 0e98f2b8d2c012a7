"""Detailed descriptions from the stage-1 model, with the paper's "Continue" rule (MiniGPT-4 §3.3).

Every image gets ``CURATE_PROMPT``; an answer shorter than ``CONTINUE_MIN_TOKENS`` LLM tokens gets a
second turn, ``CURATE_PROMPT + answer + CONTINUE_TURN`` on the same image, and the continuation is
appended. The rows that need continuing go through the model as one batch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from mgpt4.config import GenerateConfig
from mgpt4.conversation import CONTINUE_MIN_TOKENS, CONTINUE_TURN, CURATE_PROMPT

if TYPE_CHECKING:
    from mgpt4.model.minigpt4 import MiniGPT4


@dataclasses.dataclass
class Description:
    """One image's generated text before fixing."""

    first: str
    first_tokens: int
    continuation: str | None = None
    continuation_tokens: int = 0
    seconds_first: float = 0.0
    seconds_continue: float = 0.0

    @property
    def text(self) -> str:
        """The answer with its continuation appended (space-joined)."""
        if not self.continuation:
            return self.first
        return f"{self.first} {self.continuation}".strip()

    @property
    def continued(self) -> bool:
        return self.continuation is not None


def continue_prompt(answer: str, prompt: str = CURATE_PROMPT) -> str:
    """The second turn: the first exchange, then ``###Human: Continue ###Assistant: ``."""
    return prompt + answer + CONTINUE_TURN


def describe_batch(
    model: MiniGPT4,
    images: torch.Tensor,
    config: GenerateConfig,
    min_tokens: int = CONTINUE_MIN_TOKENS,
    prompt: str = CURATE_PROMPT,
) -> list[Description]:
    """Describe a batch of images; answers under ``min_tokens`` tokens are continued once.

    Args:
        model: a ``MiniGPT4`` (anything with ``generate(prompts, images, config)``).
        images: (B, 3, H, W) transformed images.
        config: decoding settings for both turns.
        min_tokens: the Continue threshold, counted in LLM tokens (``Generation.tokens``).
        prompt: the first-turn prompt with one ``<ImageHere>`` (default: the paper's).
    """
    start = time.perf_counter()
    first = model.generate([prompt] * len(images), images, config)
    per_row = (time.perf_counter() - start) / max(1, len(images))
    rows = [Description(g.text, g.tokens, seconds_first=per_row) for g in first]
    short = [i for i, g in enumerate(first) if g.tokens < min_tokens]
    if short:
        start = time.perf_counter()
        prompts = [continue_prompt(rows[i].first, prompt) for i in short]
        more = model.generate(prompts, images[short], config)
        per_row = (time.perf_counter() - start) / len(short)
        for index, generation in zip(short, more, strict=True):
            rows[index].continuation = generation.text
            rows[index].continuation_tokens = generation.tokens
            rows[index].seconds_continue = per_row
    return rows
