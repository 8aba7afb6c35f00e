"""Projection / prediction MLPs and the multi-crop wrapper that puts a head on a backbone.

Shape legend: [B, D] pooled backbone features (batch, dim); [V*B, P] head outputs of V views
stacked view-major (rows ``v*B .. (v+1)*B - 1`` belong to view v).

- :class:`ProjectionMLP`: the MLP heads of SimCLR (Chen et al., 2020: Linear-BN-ReLU-Linear),
  MoCo v2 (Chen et al., 2020b: Linear-ReLU-Linear) and MoCo v3 (Chen, Xie & He, 2021: 3-layer
  projector / 2-layer predictor with BN on every layer, the last BN without affine).
- :class:`MultiCropWrapper`: DINO's wrapper (Caron et al., 2021): views of equal resolution run
  through the backbone in one batched call, the head (and predictor) run once on all of them.
  It is the ``student`` a method hands to the engine, so DDP / FSDP2 / ZeRO see ONE forward
  per step however many crops there are.

BatchNorm here is plain ``nn.BatchNorm1d``; in multi-process runs the engine converts it to
``parallel.global_batchnorm.GlobalBatchNorm`` (statistics over all ranks' rows, SimCLR's global
BN; ``parallel.global_batchnorm=false`` keeps per-process statistics).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["MultiCropWrapper", "ProjectionMLP"]

Norm = Literal["none", "bn"]


class ProjectionMLP(nn.Sequential):
    """``num_layers`` linear layers: [B, in_dim] -> [B, out_dim].

    Hidden layers are Linear (+ BN) + ReLU. ``norm="bn"`` drops the linear biases (BN has its
    own shift) and, with ``last_norm``, ends in an affine-free BN as in MoCo v3's projector.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 norm: Norm = "none", last_norm: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        if norm not in ("none", "bn"):
            raise ValueError(f"norm: must be 'none' or 'bn', got {norm!r}")
        layers: list[nn.Module] = []
        bn = norm == "bn"
        for i in range(num_layers):
            last = i == num_layers - 1
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if last else hidden_dim
            layers.append(nn.Linear(d_in, d_out, bias=not bn))
            if bn and not last:
                layers.append(nn.BatchNorm1d(d_out))
            if bn and last and last_norm:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


def _same_size_runs(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive views with equal spatial size."""
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


class MultiCropWrapper(nn.Module):
    """backbone -> head (-> predictor) over a list of views, in one module call.

    forward(views): ``views`` is a list of V tensors [B, C, H_v, W_v] (or one tensor [B, C, H, W]);
    returns [V*B, P], view-major. Views are grouped into runs of equal resolution (DINO orders
    its crops global first, local after), so the backbone runs once per run.

    ``predictor`` (MoCo v3) is kept as its own attribute so that a momentum copy without it has
    exactly the student's parameter names minus ``predictor.*``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.predictor = predictor

    def forward(self, views: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        if not views:
            raise ValueError("MultiCropWrapper: no views")
        feats = [self.backbone(torch.cat(list(views[a:b]))) for a, b in _same_size_runs(views)]
        out = self.head(torch.cat(feats) if len(feats) > 1 else feats[0])
        if self.predictor is not None:
            out = self.predictor(out)
        return out
