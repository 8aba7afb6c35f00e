"""Schedules as pure functions of the global optimizer step, plus the lr-scheduler glue.

The functions serve every scheduled quantity (lr, weight decay, EMA momentum, teacher
temperature): they take the *global optimizer step* (0-based, counted after gradient
accumulation) and return a float, so resume only needs the step counter.

The lr glue is a ``torch.optim.lr_scheduler.LambdaLR`` whose lambda is an instance of the
top-level class :class:`LRMultiplier`: LambdaLR's ``state_dict`` stores a callable object's
``__dict__`` (a plain lambda is silently dropped), and the instance pickles, so the scheduler
round-trips through ``torch.save`` and accelerate's ``save_state`` / ``register_for_checkpointing``.

Accelerate caveat: a scheduler passed through ``Accelerator.prepare`` is stepped
``num_processes`` times per call unless the Accelerator is built with
``step_scheduler_with_optimizer=False`` (or ``split_batches=True``); our schedules count
optimizer steps, so the trainer must use that flag, or not pass the scheduler to ``prepare``
and register it with ``register_for_checkpointing`` instead.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "cosine", "linear", "warmup_cosine", "linear_warmup_then_constant",
    "LRMultiplier", "build_lr_scheduler",
]


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


class LRMultiplier:
    """Picklable LambdaLR lambda: ``multiplier(step) = schedule(step) / lr``.

    Each param group's ``initial_lr`` is ``lr * lr_scale`` (set by ``build_optimizer``), so a
    group's lr is ``lr_scale * schedule(step)``: with layer decay the min lr and warmup start
    are scaled too, exactly as in MAE's ``adjust_learning_rate``. All attributes are plain
    numbers/strings so LambdaLR's ``state_dict`` (which stores ``__dict__``) restores them.
    """

    def __init__(self, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                 start_warmup_lr: float = 0.0, kind: str = "cosine") -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"schedule: must be 'cosine' or 'constant', got {kind!r}")
        if lr <= 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps: need 0 <= {warmup_steps} <= total_steps={total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.start_warmup_lr = float(start_warmup_lr)
        self.kind = kind

    def value(self, step: int) -> float:
        """Absolute lr (for a group with lr_scale 1) at ``step``."""
        if self.kind == "constant":
            return linear_warmup_then_constant(step, self.warmup_steps, self.lr, self.start_warmup_lr)
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr,
                             self.start_warmup_lr)

    def __call__(self, step: int) -> float:
        return self.value(step) / self.lr

    def __repr__(self) -> str:
        return f"LRMultiplier({self.__dict__})"


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    min_lr: float,
    start_warmup_lr: float = 0.0,
    kind: str = "cosine",
) -> LambdaLR:
    """Per-optimizer-step LambdaLR: group lr = ``group initial lr * schedule(step) / lr``.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. Right after construction
    the groups already hold the step-0 lr.
    """
    mult = LRMultiplier(total_steps=total_steps, warmup_steps=warmup_steps, lr=lr, min_lr=min_lr,
                        start_warmup_lr=start_warmup_lr, kind=kind)
    return LambdaLR(optimizer, lr_lambda=mult)
