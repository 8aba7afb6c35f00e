"""DRLoc localization MLP and the student wrapper that adds it to a supervised backbone.

Liu et al., "Efficient Training of Visual Transformers with Small Datasets" (NeurIPS 2021):
from the final grid of token embeddings (class token excluded; larger grids average-pooled to
k x k, 14x14 -> 7x7 in the paper), m pairs of cells are sampled per image and an MLP on the
concatenated pair embeddings (two hidden layers of 512) predicts their normalised offset
(see dist_ssl.losses.drloc). The grid comes from ``forward_tokens``, so plain ViTs (reshaped
patch tokens), Swin (final map) and ResNets (last feature map) all work.

Shapes: x [B, C, H, W]; tokens [B, h*w, D]; u [B, m, 4] uniform draws in [0, 1) that pick the
pairs; positions [B, m, 2] (row, column); predictions / targets [B, m, 2]; logits [B, K].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_ssl.losses.drloc import drloc_targets
from dist_ssl.models.factory import feature_dim, forward_tokens


class DRLocMLP(nn.Module):
    """[.., 2D] concatenated pair embeddings -> [.., 2] offsets (Linear-ReLU-Linear-ReLU-Linear)."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs)


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Average-pool a grid larger than k x k down to it: [B, h*w, D] -> [B, h'*w', D]."""
    h, w = grid
    if h <= k and w <= k:
        return tokens, (h, w)
    size = (min(h, k), min(w, k))
    fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    pooled = F.adaptive_avg_pool2d(fmap, size)
    return pooled.flatten(2).transpose(1, 2), size


def pair_positions(u: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform draws u [B, m, 4] -> cell positions pos_a, pos_b [B, m, 2] on a (rows, cols) grid
    (independent uniform cells, as the reference implementation samples them)."""
    scale = torch.tensor([size[0], size[1], size[0], size[1]], device=u.device, dtype=u.dtype)
    cells = (u * scale).long().minimum(scale.long() - 1)
    return cells[..., :2], cells[..., 2:]


def gather_cells(tokens: torch.Tensor, pos: torch.Tensor, cols: int) -> torch.Tensor:
    """tokens [B, h*w, D], pos [B, m, 2] -> embeddings [B, m, D] of those cells."""
    flat = pos[..., 0] * cols + pos[..., 1]
    return tokens.gather(1, flat.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class DRLocStudent(nn.Module):
    """Backbone + DRLoc MLP as ONE module, so data parallelism syncs both.

    ``forward(x)`` is exactly the backbone's forward (logits [B, K]); ``forward(x, u)`` returns
    (logits [B, K], predicted offsets [B, m, 2], target offsets [B, m, 2]) from one backbone pass.
    """

    def __init__(self, backbone: nn.Module, grid: int = 7, hidden: int = 512):
        super().__init__()
        self.backbone = backbone
        self.grid = grid
        self.drloc = DRLocMLP(feature_dim(backbone), hidden)

    def forward(self, x: torch.Tensor, u: Optional[torch.Tensor] = None):
        if u is None:
            return self.backbone(x)
        out = forward_tokens(self.backbone, x)
        logits = self.backbone.get_classifier()(out.pooled)  # = backbone(x): forward_head's last step
        tokens, size = pool_grid(out.tokens, out.grid, self.grid)
        pos_a, pos_b = pair_positions(u, size)
        pairs = torch.cat([gather_cells(tokens, pos_a, size[1]), gather_cells(tokens, pos_b, size[1])], dim=-1)
        return logits, self.drloc(pairs), drloc_targets(pos_a, pos_b, size)
