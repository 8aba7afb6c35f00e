"""The lr scheduler over the step schedules of :mod:`dist_ssl.step_schedules`.

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

import torch
from torch.optim.lr_scheduler import LambdaLR

from dist_ssl.step_schedules import linear_warmup_then_constant, warmup_cosine

__all__ = ["LRMultiplier", "build_lr_scheduler"]


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
