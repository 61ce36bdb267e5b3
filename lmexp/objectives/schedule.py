"""Learning-rate schedules, as multipliers of the peak rate at each optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

Schedule = Literal["cosine", "linear", "wsd"]
SCHEDULES = ("cosine", "linear", "wsd")


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


def warmup_linear(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then a straight line down to ``min_lr_ratio`` at ``total_steps`` (and there after).

    The schedule pretrained encoders are usually fine-tuned with (``min_lr_ratio`` 0: decay to zero).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def warmup_length(warmup_steps: int | None, warmup_fraction: float | None, total_steps: int, default: int) -> int:
    """Warmup steps: ``warmup_steps`` as given, or ``warmup_fraction`` of the planned ``total_steps``
    (rounded down, so below ``total_steps`` for a fraction under 1), else ``default``."""
    if warmup_fraction is not None:
        return int(warmup_fraction * total_steps + 1e-9)  # 0.29 * 100 is 28.999...: not 28
    return default if warmup_steps is None else warmup_steps


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
    if schedule == "linear":
        return lambda step: warmup_linear(step, warmup_steps, total_steps, min_lr_ratio)
    return lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
