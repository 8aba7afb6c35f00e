"""Schedules as pure functions of the global optimizer step.

Every scheduled quantity (lr, weight decay, EMA / teacher momentum, teacher temperature) is one
of these: it takes the *global optimizer step* (0-based, counted after gradient accumulation)
and returns a float, so resume only needs the step counter. Plain math, no torch: the methods
(teacher momentum and temperature) and the engine (lr, weight decay) both read them, so they
sit below both.
"""
from __future__ import annotations

import math

__all__ = ["cosine", "linear", "warmup_cosine", "linear_warmup_then_constant"]


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step >= total_steps)."""
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    t = max(step, 0) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear(step: int, total_steps: int, start: float, end: float) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step >= total_steps), then constant."""
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    return start + (end - start) * max(step, 0) / total_steps


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_value: float,
    final_value: float,
    start_warmup_value: float = 0.0,
) -> float:
    """Linear warmup ``start_warmup_value -> base_value`` over ``warmup_steps``, then cosine to ``final_value``.

    Reaches ``base_value`` exactly at ``step == warmup_steps`` (MAE convention) and
    ``final_value`` at ``step == total_steps``; later steps stay at ``final_value``.
    """
    if step < warmup_steps:
        return linear(step, warmup_steps, start_warmup_value, base_value)
    return cosine(step - warmup_steps, total_steps - warmup_steps, base_value, final_value)


def linear_warmup_then_constant(
    step: int, warmup_steps: int, base_value: float, start_warmup_value: float = 0.0
) -> float:
    """Linear ramp to ``base_value`` over ``warmup_steps`` then flat (e.g. DINO teacher temperature)."""
    return linear(step, warmup_steps, start_warmup_value, base_value)
