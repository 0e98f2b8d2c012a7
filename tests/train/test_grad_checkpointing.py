"""Checkpointing a *trainable* ViT as well as the LLM: the same gradients everywhere, projection included.

(The frozen-tower case, projection only, is in tests/model/test_minigpt4.py.)
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from mgpt4.config import ModelConfig
from mgpt4.model.build import build_model


def _grads(trainable: list[str], checkpointing: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    calls = 0
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="micro", trainable=trainable, grad_checkpointing=checkpointing))
    model.train()
    torch.manual_seed(1)
    texts = ["a red circle at the top\n", "two squares\n", "a star\n"]
    batch = {"image": torch.randn(3, 3, 64, 64), "text": texts}
    model(batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, calls


def test_grads_are_nonzero_and_equal_with_checkpointing_when_the_vit_trains(monkeypatch):
    trainable = ["proj", "vision"]
    plain, plain_calls = _grads(trainable, False, monkeypatch)
    checkpointed, calls = _grads(trainable, True, monkeypatch)
    assert plain_calls == 0 and calls > 0  # checkpointing really ran
    assert plain.keys() == checkpointed.keys()
    assert plain["llama_proj.weight"].abs().sum() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(n.startswith("visual_encoder.") and g.abs().sum() > 0 for n, g in checkpointed.items())
