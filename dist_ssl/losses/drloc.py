"""Dense relative localization (DRLoc) loss.

Liu et al., "Efficient Training of Visual Transformers with Small Datasets" (NeurIPS 2021),
Sec. 3, Eq. 2-4: for pairs of cells (i, j), (p, h) of the final k x k embedding grid, an MLP
predicts their normalised offset ``(|i - p| / k, |j - h| / k)``; the loss is the L1 distance,
averaged over pairs and images. Non-square (h x w) grids normalise each axis by its own size.

Shapes: [B, m, 2] = batch, pairs per image, (row, column).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def drloc_targets(pos_a: torch.Tensor, pos_b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised absolute offsets [B, m, 2] of integer cell positions pos_a, pos_b [B, m, 2]
    on a grid of ``size`` = (rows, columns)."""
    scale = torch.tensor(size, dtype=torch.float32, device=pos_a.device)
    return (pos_a - pos_b).abs().float() / scale


def drloc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between predicted [B, m, 2] and target offsets (Eq. 4)."""
    return F.l1_loss(pred.float(), target)
