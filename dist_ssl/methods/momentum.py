"""Momentum teachers: a frozen copy of the student that follows it by an exponential moving average.

BYOL / MoCo (He et al., 2020) / DINO (Caron et al., 2021): ``teacher = m * teacher + (1 - m) *
student`` after every optimizer step. MoCo v2, MoCo v3 and DINO build, update and run their
teacher with these helpers; the engine's model EMA (``engine/ema.py``) uses ``ema_update_`` too.
The momentum schedules are in ``dist_ssl.step_schedules``.

Shapes: views V x [B, C, H, W]; teacher outputs [V*B, P].
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from dist_ssl.heads.projection import MultiCropWrapper
from dist_ssl.models.export import unwrap_model
from dist_ssl.parallel.full_params import full_parameters

__all__ = ["ema_update_", "momentum_teacher", "momentum_update_", "teacher_forward"]


@torch.no_grad()
def ema_update_(
    target_params: Iterable[torch.Tensor],
    source_params: Iterable[torch.Tensor],
    momentum: float,
) -> None:
    """In place: ``target = momentum * target + (1 - momentum) * source`` (BYOL/DINO teacher).

    Lists must align one to one; tensors with a different dtype/device are moved to the
    target's. Uses the multi-tensor ``_foreach_lerp_`` kernel (one launch for all params).
    """
    targets = list(target_params)
    sources = list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} targets vs {len(sources)} sources")
    if not targets:
        return
    sources = [s.detach().to(device=t.device, dtype=t.dtype) for t, s in zip(targets, sources)]
    # lerp_(s, w) computes t + w * (s - t) == (1 - w) * t + w * s.
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def momentum_teacher(student: MultiCropWrapper) -> MultiCropWrapper:
    """Frozen copy of the student without its predictor and without stochastic depth.

    Built before the engine wraps / shards the student (FSDP2 modules refuse deepcopy).
    """
    teacher = MultiCropWrapper(copy.deepcopy(student.backbone), copy.deepcopy(student.head))
    for m in teacher.modules():
        if hasattr(m, "drop_prob"):  # timm DropPath: the teacher sees the whole network
            m.drop_prob = 0.0
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def momentum_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` for every teacher parameter, matched by name.

    ``student`` may be wrapped (DDP, torch.compile) or sharded in place (FSDP2 DTensors,
    DeepSpeed ZeRO-3 partitions): sharded parameters are gathered (``parallel.full_params``,
    a collective, so every rank must call this). Buffers (BN statistics) are the teacher's
    own, as in MoCo.
    """
    source = dict(unwrap_model(student).named_parameters())
    targets, sources = [], []
    for name, t in teacher.named_parameters():
        if name not in source:
            raise KeyError(f"momentum_update_: teacher parameter {name!r} has no student counterpart")
        targets.append(t)
        sources.append(source[name])
    with full_parameters(sources) as full:  # FSDP2 / ZeRO-3: a collective
        ema_update_(targets, full, momentum)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Teacher outputs [V*B, P] in float32; inputs are cast to the teacher's dtype (DeepSpeed
    bf16 runs hand the method bf16 views, the teacher stays fp32)."""
    dtype = next(teacher.parameters()).dtype
    return teacher([v.to(dtype) for v in views]).float()
