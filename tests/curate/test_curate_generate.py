"""The Continue rule on the real micro model: which rows continue, with what prompt, in one batch."""

from __future__ import annotations

import pytest
import torch

from mgpt4.config import GenerateConfig
from mgpt4.conversation import CONTINUE_MIN_TOKENS, CONTINUE_TURN, CURATE_PROMPT
from mgpt4.curate.generate import continue_prompt, describe_batch
from mgpt4.model.build import load_model_dir


class _Recorder:
    """Passes every call to the real model and records the prompts of each call."""

    def __init__(self, model):
        self.model = model
        self.calls: list[list[str]] = []
        self.results = []

    def generate(self, prompts, images, config):
        self.calls.append(list(prompts))
        out = self.model.generate(prompts, images, config)
        self.results.append(out)
        return out


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model_dir(micro_model_dir)


def test_continue_prompt_is_the_second_turn():
    assert continue_prompt("A red circle.") == CURATE_PROMPT + "A red circle." + CONTINUE_TURN
    assert CONTINUE_MIN_TOKENS == 80


def test_short_answers_are_continued_in_one_batch_and_appended(micro):
    spy = _Recorder(micro)
    images = torch.randn(3, 3, 64, 64)
    rows = describe_batch(spy, images, GenerateConfig(max_new_tokens=6, repetition_penalty=1.0))
    assert len(spy.calls) == 2  # first turn for all, then one batched Continue call
    assert spy.calls[0] == [CURATE_PROMPT] * 3
    short = [i for i, g in enumerate(spy.results[0]) if g.tokens < CONTINUE_MIN_TOKENS]
    assert short == [0, 1, 2]
    assert spy.calls[1] == [continue_prompt(spy.results[0][i].text) for i in short]
    for row, first, more in zip(rows, spy.results[0], spy.results[1], strict=True):
        assert row.continued and row.first_tokens == first.tokens <= 6
        assert row.continuation == more.text and row.continuation_tokens == more.tokens
        assert row.text == f"{first.text} {more.text}".strip()


def test_threshold_is_a_token_count(micro):
    spy = _Recorder(micro)
    images = torch.randn(2, 3, 64, 64)
    rows = describe_batch(spy, images, GenerateConfig(max_new_tokens=6), min_tokens=3)
    first = spy.results[0]
    assert all(g.tokens >= 3 for g in first)  # the random micro model never stops within 6 tokens
    assert len(spy.calls) == 1 and not any(r.continued for r in rows)
    assert [r.text for r in rows] == [g.text for g in first]
