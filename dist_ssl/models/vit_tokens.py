"""A timm ViT run piecewise, and the token grid of a ViT-like backbone's output.

The masked-image-modeling methods run a stock timm ``VisionTransformer`` in pieces (patch
embedding + position embedding, then the blocks on any subset of tokens): BEiT puts mask tokens
in the encoder (Bao et al., 2021), MAE encodes the visible patches only (He et al., 2021) and
SplitMask each of two disjoint subsets (El-Nouby et al., 2021). The backbone stays a stock timm
model, so exported weights load with ``timm.create_model``. ``token_grid`` tells
``factory.forward_tokens`` the (h, w) of any ViT-like model's output tokens.

Shapes: x [B, C, H, W]; [B, N, D] patch tokens in row-major grid order (N = h * w);
[B, P, D] prefix tokens (class / register tokens); [B, n, D] a visible subset; ids [B, n] patch
positions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["check_vit", "encode_visible", "gather_rows", "token_grid", "vit_embed", "vit_encode", "vit_grid",
           "vit_patch_size"]


def check_vit(model: nn.Module, method: str) -> None:
    """ValueError unless ``model`` is a plain timm ViT (what MIM encoders run piecewise)."""
    needed = ("patch_embed", "_pos_embed", "blocks", "norm_pre", "norm", "num_prefix_tokens")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise ValueError(f"model.name: {method} needs a plain ViT backbone (timm VisionTransformer); "
                         f"{type(model).__name__} lacks {', '.join(missing)}")


def vit_grid(vit: nn.Module) -> tuple[int, int]:
    """(h, w) patch grid of the ViT's configured image size."""
    return tuple(int(g) for g in vit.patch_embed.grid_size)


def vit_patch_size(vit: nn.Module) -> int:
    """Side of a (square) patch in pixels."""
    return int(vit.patch_embed.patch_size[0])


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids [B, n] -> [B, n, D] (row b keeps x[b, ids[b]])."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def vit_embed(vit: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              mask_token: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix [B, P, D], patches [B, N, D]) with position embeddings added.

    With ``mask`` [B, N] (True = masked) the masked patch embeddings are replaced by
    ``mask_token`` [1, 1, D] *before* the position embedding, as in BEiT (Sec. 2.3).
    """
    tokens = vit.patch_embed(x)  # [B, N, D], or [B, h, w, D] with dynamic_img_size
    if mask is not None:
        w = mask.reshape(*tokens.shape[:-1], 1).to(tokens.dtype)
        tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
    seq = vit._pos_embed(tokens)
    p = int(vit.num_prefix_tokens)
    return seq[:, :p], seq[:, p:]


def vit_encode(vit: nn.Module, prefix: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the ViT blocks + final norm on prefix [B, P, D] + any patch tokens [B, n, D]."""
    seq = vit.norm_pre(torch.cat([prefix, patches], dim=1))
    seq = vit.norm(vit.blocks(seq))
    p = prefix.shape[1]
    return seq[:, :p], seq[:, p:]


def encode_visible(vit: nn.Module, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Encoder outputs [B, n, D] of the visible patches ``ids_keep`` [B, n] only (MAE/SplitMask)."""
    prefix, patches = vit_embed(vit, x)
    return vit_encode(vit, prefix, gather_rows(patches, ids_keep))[1]


def token_grid(model: nn.Module, x: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """(h, w) of the ``num_tokens`` spatial tokens a ViT-like model makes of the image x [B, C, H, W]."""
    patch_embed = getattr(model, "patch_embed", None)
    if hasattr(model, "feature_grid"):  # T2T-ViT, CvT: no patch embedding, they know their grid
        grid = tuple(int(g) for g in model.feature_grid(tuple(x.shape[-2:])))
    elif patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(int(g) for g in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
    else:  # assume a square grid
        side = math.isqrt(num_tokens)
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"forward_tokens: {num_tokens} tokens do not form the grid {grid}")
    return grid
