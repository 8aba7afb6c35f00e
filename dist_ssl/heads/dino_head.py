"""The DINO projection head (Caron et al., 2021, "Emerging Properties in Self-Supervised
Vision Transformers", Sec. 3 and Appendix): MLP -> L2-normalised bottleneck -> weight-normalised
linear layer to K prototypes.

Shapes: x [B, D] pooled backbone features -> [B, K] logits (K = ``out_dim``; DINO used 65,536,
the IDMM paper's comparison 256).

The last layer's weight normalisation ``W = g * V / ||V||_row`` is written out by hand rather
than with ``torch.nn.utils.weight_norm`` (deprecated) or a parametrization: plain parameters are
what FSDP2 and DeepSpeed ZeRO shard without surprises. With ``norm_last_layer`` (DINO's default)
``g`` is fixed to 1 and not a parameter at all.

Freezing the last layer during the first epoch (DINO's ``freeze_last_layer``) is done in the
forward pass: while the attribute ``freeze_last_layer`` is True (the method sets it per step, so
the head can be called as ``head(x)`` inside a MultiCropWrapper) the layer's value is used with
a zero gradient.
DINO sets those gradients to None after backward instead; a zero gradient keeps every parameter
in the graph (DDP without ``find_unused_parameters``) and leaves AdamW's moments at zero, so the
layer does not move (decoupled weight decay only rescales V, which the normalisation cancels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead"]


def _frozen(p: torch.Tensor) -> torch.Tensor:
    """Same value as ``p``, zero gradient (``p`` stays in the autograd graph)."""
    return p.detach() + p * 0.0


class DINOHead(nn.Module):
    """[B, in_dim] -> [B, out_dim]: ``num_layers``-layer GELU MLP to ``bottleneck_dim``,
    L2 normalisation, then the weight-normalised prototype layer (no bias)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # DINO: trunc_normal(std=.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # V [K, bottleneck]: nn.Linear's default (Kaiming-uniform) init, as DINO's weight_norm(Linear).
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))
        self.last_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))
        self.out_dim = out_dim
        self.freeze_last_layer = False  # plain attribute, set by the method before each step

    def last_layer_weight(self, freeze: bool = False) -> torch.Tensor:
        """W [K, bottleneck] = g * V / ||V|| (row-wise)."""
        v = _frozen(self.last_v) if freeze else self.last_v
        w = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.last_g is not None:
            w = w * (_frozen(self.last_g) if freeze else self.last_g)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, self.last_layer_weight(self.freeze_last_layer))

