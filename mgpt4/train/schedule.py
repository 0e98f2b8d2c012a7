"""MiniGPT-4's learning-rate schedule (MG ``common/optims.py`` LinearWarmupCosineLRScheduler).

While the total step is below ``warmup_steps`` the rate rises linearly from ``warmup_lr`` to ``init_lr``
using the step *within the epoch*; afterwards it follows a cosine from ``init_lr`` to ``min_lr`` over all
``max_epoch * iters_per_epoch`` steps, indexed by the global step (no restart).
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    init_lr: float,
    min_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    iters_per_epoch: int,
    total_steps: int,
) -> float:
    """The learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        epoch_step = step % iters_per_epoch
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * epoch_step / max(warmup_steps, 1))
    progress = step / max(total_steps, 1)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
