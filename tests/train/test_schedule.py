"""The warmup + cosine schedule against MG common/optims.py LinearWarmupCosineLRScheduler."""

from __future__ import annotations

import math

import pytest

from mgpt4.train.schedule import lr_at

STAGE1 = dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, iters_per_epoch=5000,
              total_steps=20000)  # fmt: skip


def official(step: int, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, total_steps) -> float:
    """MG's scheduler written out as the runner calls it: step(cur_epoch, cur_step) per iteration."""
    epoch, epoch_step = divmod(step, iters_per_epoch)
    total_cur_step = epoch * iters_per_epoch + epoch_step
    if total_cur_step < warmup_steps:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * epoch_step / max(warmup_steps, 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * total_cur_step / total_steps)) + min_lr


@pytest.mark.parametrize("step", [0, 1, 2500, 4999, 5000, 5001, 10000, 15000, 19999])
def test_stage1_matches_official(step):
    assert lr_at(step, **STAGE1) == pytest.approx(official(step, **STAGE1), rel=1e-12)


def test_warmup_then_cosine_shape():
    assert lr_at(0, **STAGE1) == 1e-6
    assert lr_at(2500, **STAGE1) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    # After warmup the cosine is already slightly below init_lr (it is indexed by the global step).
    assert 8e-5 < lr_at(5000, **STAGE1) < 1e-4
    assert lr_at(20000, **STAGE1) == pytest.approx(8e-5)
    lrs = [lr_at(s, **STAGE1) for s in range(5000, 20001, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_uses_the_step_within_the_epoch():
    # Stage 2: 200 warmup steps, 200 per epoch — warmup ends with the first epoch.
    stage2 = dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, iters_per_epoch=200,
                  total_steps=1000)  # fmt: skip
    assert lr_at(199, **stage2) == pytest.approx(1e-6 + (3e-5 - 1e-6) * 199 / 200)
    # A warmup longer than an epoch restarts its ramp at each epoch boundary (as officially).
    long = dict(stage2, warmup_steps=300)
    assert lr_at(250, **long) == pytest.approx(1e-6 + (3e-5 - 1e-6) * 50 / 300)
    assert lr_at(250, **long) == pytest.approx(official(250, **long))


STAGE2 = dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, iters_per_epoch=200,
              total_steps=1000)  # fmt: skip


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        (STAGE1, 4999, 9.998020e-5),  # 1e-6 + 99e-6 * 4999/5000
        (STAGE1, 5000, 9.7071068e-5),  # cosine at t/T = 1/4: 8e-5 + 2e-5 * 0.5 * (1 + cos(pi/4)), not init_lr
        (STAGE1, 10000, 9.0e-5),  # halfway: 8e-5 + 2e-5 * 0.5
        (STAGE1, 15000, 8.2928932e-5),  # 8e-5 + 2e-5 * 0.5 * (1 + cos(3pi/4))
        (STAGE2, 0, 1e-6),
        (STAGE2, 100, 1.55e-5),  # 1e-6 + 29e-6 * 0.5
        (STAGE2, 200, 2.8090170e-5),  # 1e-5 + 2e-5 * 0.5 * (1 + cos(pi/5))
        (STAGE2, 500, 2.0e-5),  # halfway
        (STAGE2, 999, 1.0000049e-5),  # 1e-5 + 2e-5 * 0.5 * (1 + cos(0.999 pi))
    ],
    ids=lambda value: str(value) if not isinstance(value, dict) else f"stage{1 if value is STAGE1 else 2}",
)
def test_hand_computed_points(schedule, step, expected):
    assert lr_at(step, **schedule) == pytest.approx(expected, rel=1e-6)
