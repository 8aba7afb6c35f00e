"""Masked-image-modeling building blocks: ViT encoding of visible patches, and a decoder.

ViT helpers run a timm ``VisionTransformer`` piecewise (patch embedding + position embedding,
then the blocks on any subset of tokens), which is what BEiT (mask tokens in the encoder; Bao et
al., 2021), MAE (visible patches only; He et al., 2021) and SplitMask (each of two disjoint
subsets; El-Nouby et al., 2021) need. The backbone stays a stock timm model, so the exported
weights load with ``timm.create_model``.

:class:`MIMDecoder` is MAE's decoder (Sec. 3, "MAE decoder"): embed the encoder outputs, append
a learned mask token per missing patch, un-shuffle to patch order with ``ids_restore``, add fixed
2-D sin-cos position embeddings (so a mask token says *where* it is), transformer blocks, norm.
SplitMask uses it with 2 blocks at the encoder width.

Shapes: x [B, C, H, W]; [B, N, D] patch tokens in row-major grid order (N = h * w);
[B, P, D] prefix tokens (class / register tokens); [B, n, D] a visible subset; ids [B, n] patch
positions; ``ids_restore`` [B, N] (see ``dist_ssl.data.masking.mask_to_ids``).
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


def check_vit(model: nn.Module, method: str) -> None:
    """ValueError unless ``model`` is a plain timm ViT (what MIM encoders run piecewise)."""
    needed = ("patch_embed", "_pos_embed", "blocks", "norm_pre", "norm", "num_prefix_tokens")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise ValueError(f"model.name: {method} needs a plain ViT backbone (timm VisionTransformer); "
                         f"{type(model).__name__} lacks {', '.join(missing)}")


def vit_grid(vit: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in vit.patch_embed.grid_size)


def vit_patch_size(vit: nn.Module) -> int:
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


class MIMDecoder(nn.Module):
    """Shallow transformer decoder over all N positions; ``forward`` -> hidden [B, N, dim].

    The prediction layer ``pred`` (dim -> out_dim: vocabulary logits or pixels) is applied by
    the method, usually to the masked positions only (saves a [B, N, V] logit tensor).
    """

    def __init__(self, grid: tuple[int, int], in_dim: int, dim: int, depth: int, num_heads: int,
                 out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, not learned (MAE): recomputed on load, so not part of the state dict
        self.register_buffer("pos_embed", build_sincos2d_pos_embed(list(grid), dim)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def assemble(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """visible [B, n, dim] in ``ids_keep`` order -> [B, N, dim] in patch order, mask
        tokens at the N - n missing positions (MAE's un-shuffle)."""
        b, n, d = visible.shape
        missing = self.mask_token.to(visible.dtype).expand(b, ids_restore.shape[1] - n, d)
        return gather_rows(torch.cat([visible, missing], dim=1), ids_restore)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        seq = self.assemble(self.embed(visible), ids_restore) + self.pos_embed.to(visible.dtype)
        return self.norm(self.blocks(seq))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):  # MAE: xavier-uniform linear layers, zero biases
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
