"""Learning-rate schedules, as multipliers of the peak rate at each optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

Schedule = Literal["cosine", "wsd"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Rises linearly to 1 over ``warmup_steps``, then follows a half cosine down to
    ``min_lr_ratio`` at ``total_steps`` and stays there.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float
) -> float:
    """Warmup-stable-decay: linear warmup, the peak rate held, then a linear decay to
    ``min_lr_ratio`` over the last ``decay_fraction`` of ``total_steps``.

    Holding the peak longer than cosine does makes faster progress mid-run; the short final decay
    recovers what the high rate left on the table.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def lr_multiplier(
    schedule: Schedule, warmup_steps: int, total_steps: int, min_lr_ratio: float, decay_fraction: float
) -> Callable[[int], float]:
    """The schedule as a function of the step, for ``LambdaLR``."""
    if schedule == "wsd":
        return lambda step: warmup_stable_decay(step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    return lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
