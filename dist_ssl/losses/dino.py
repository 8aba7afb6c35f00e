"""DINO self-distillation loss with centering (Caron et al., 2021, "Emerging Properties in
Self-Supervised Vision Transformers", Alg. 1 and Eq. 3-4).

Shape legend: [B, K] head outputs of one view for this rank's B images (K prototypes);
S student views (global first, then local), T teacher views (the global ones; teacher view i
is the same crop as student view i).

    loss = mean over pairs (i, v), i < T, v < S, v != i, of
           mean_b  -softmax((t_i - c) / tau_t) . log_softmax(s_v / tau_s)

The center c [1, K] is an EMA of the mean teacher output over the GLOBAL batch:
``c <- m c + (1 - m) mean(teacher outputs of all ranks)``. :meth:`DINOLoss.update_center`
all-reduces (sum, count) so every rank holds the same center even with uneven batches.

Numerics: logits are cast to float32 before the softmaxes, so fp16/bf16 heads cannot overflow
``exp`` here (a source of DINO NaNs with fp16 autocast).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_ssl.parallel.collectives import all_reduce_mean

__all__ = ["DINOLoss", "dino_loss"]


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
              center: torch.Tensor, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between centred, sharpened teacher and student distributions.

    student_out: S tensors [B, K]; teacher_out: T tensors [B, K] (no gradient flows into them);
    center: [1, K]. Returns the mean over the T * S - min(T, S) view pairs, each averaged over B.
    """
    if not teacher_out or len(student_out) < 2:
        raise ValueError("dino_loss: need >= 1 teacher view and >= 2 student views")
    log_s = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    probs_t = [F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher_out]
    total, pairs = 0.0, 0
    for i, p in enumerate(probs_t):
        for v, ls in enumerate(log_s):
            if v == i:  # same crop: skipped
                continue
            total = total + torch.sum(-p * ls, dim=-1).mean()
            pairs += 1
    return total / pairs


class DINOLoss(nn.Module):
    """:func:`dino_loss` plus the center buffer [1, K] (saved in checkpoints as method state)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        return dino_loss(student_out, teacher_out, self.center, self.student_temp, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, count: int) -> None:
        """Fold this step's teacher outputs into the center. COLLECTIVE: every rank calls it.

        teacher_sum: [K] sum of this rank's teacher outputs (all teacher views, all images);
        count: how many rows that sum has. The global mean is sum_r(sum) / sum_r(count),
        computed as a ratio of rank means in one all-reduce of K + 1 numbers.
        """
        stats = torch.cat([teacher_sum.detach().float().reshape(-1),
                           torch.tensor([float(count)], device=teacher_sum.device)])
        stats = all_reduce_mean(stats)
        if stats[-1] <= 0:  # no teacher output on any rank since the last update
            return
        batch_center = (stats[:-1] / stats[-1]).to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(batch_center[None], alpha=1 - self.center_momentum)
