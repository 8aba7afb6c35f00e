"""The masked-image-modeling decoder (MAE, SplitMask); the encoder side is ``models/vit_tokens.py``.

:class:`MIMDecoder` is MAE's decoder (Sec. 3, "MAE decoder"): embed the encoder outputs, append
a learned mask token per missing patch, un-shuffle to patch order with ``ids_restore``, add fixed
2-D sin-cos position embeddings (so a mask token says *where* it is), transformer blocks, norm.
SplitMask uses it with 2 blocks at the encoder width.

Shapes: [B, n, D] encoder outputs of a visible subset; [B, N, D] all positions in row-major grid
order (N = h * w); ``ids_restore`` [B, N] (see ``dist_ssl.data.masking.mask_to_ids``).
"""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from dist_ssl.models.vit_tokens import gather_rows


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
