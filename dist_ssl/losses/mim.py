"""Masked image modeling losses.

* :func:`masked_token_loss`: cross-entropy of the predicted visual-token distribution at the
  masked positions (BEiT, Bao et al., 2021, Eq. 1; SplitMask, El-Nouby et al., 2021, Sec. 3.1).
* :func:`masked_pixel_loss`: MSE between predicted and per-patch normalised pixels of the
  masked patches (MAE, He et al., 2021, Sec. 3 "Reconstruction target", ``norm_pix_loss``).

Shapes: [B, N, P] = batch, patches, values per patch (C * p * p); [B, N] bool masks with
``True`` = masked; [M, V] logits of the M masked positions of the whole batch over V tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_ssl.models.tokenizers import patchify


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, detached top-1 accuracy) of logits [M, V] against token ids [M]."""
    loss = F.cross_entropy(logits.float(), targets)
    acc = (logits.detach().argmax(-1) == targets).float().mean()
    return loss, acc


def pixel_targets(x: torch.Tensor, patch: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, P] regression targets; with ``norm_pix`` each patch is
    standardised by its own mean and (unbiased) variance, as MAE's ``norm_pix_loss``."""
    target = patchify(x, patch).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def masked_pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE; pred/target [B, N, P], mask [B, N]."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
