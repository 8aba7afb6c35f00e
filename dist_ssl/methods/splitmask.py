"""SplitMask: split, inpaint, match.

El-Nouby et al., "Are Large-scale Datasets Necessary for Self-Supervised Pre-training?" (2021),
Sec. 3.1. The patches of an image are split into two disjoint subsets A and B (a block mask of
50% and its complement by default; a uniform 75% mask and its complement for the smallest data
sets). A shared ViT encoder sees only one subset's patches at a time; a shallow decoder (2
blocks at the encoder width) gets the encoded subset plus mask tokens carrying the positions of
the other subset and predicts the other subset's visual tokens (A inpaints B and B inpaints A;
BEiT cross-entropy with a data-only tokenizer). Each branch's decoder outputs are average-pooled
into a global descriptor, and a symmetric InfoNCE (tau = 0.2) matches the two descriptors of an
image against the global batch (negatives through ``all_gather_with_grad``).

Shapes: x [B, C, H, W]; mask [B, N] (True = subset B); ids_a [B, n_a], ids_b [B, n_b] (n_a +
n_b = N, equal in every row); decoder hidden [B, N, D]; logits [B * n, V]; descriptors [B, D].
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dist_ssl.data.masking import mask_to_ids
from dist_ssl.data.views import ViewSpec
from dist_ssl.heads.mim_decoder import MIMDecoder
from dist_ssl.losses.mim import masked_token_loss
from dist_ssl.losses.symmetric_info_nce import symmetric_info_nce
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.mim_common import mim_backbone, mim_masks, mim_tokenizer, mim_views
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.vit_tokens import gather_rows, vit_embed, vit_encode, vit_grid
from dist_ssl.methods.configs.splitmask import SplitMaskConfig


class SplitMaskStudent(nn.Module):
    """Shared ViT encoder + shallow decoder; one call runs both branches."""

    def __init__(self, backbone: nn.Module, grid: tuple[int, int], vocab: int, depth: int,
                 dim: Optional[int], heads: Optional[int]):
        super().__init__()
        self.backbone = backbone
        width = backbone.embed_dim
        heads = heads or backbone.blocks[0].attn.num_heads
        self.decoder = MIMDecoder(grid, width, dim or width, depth, heads, vocab)

    def encode(self, x: torch.Tensor, ids_a: torch.Tensor, ids_b: torch.Tensor):
        """Encoder outputs of subset A [B, n_a, D] and of subset B [B, n_b, D]."""
        prefix, patches = vit_embed(self.backbone, x)
        sub_a, sub_b = gather_rows(patches, ids_a), gather_rows(patches, ids_b)
        if sub_a.shape == sub_b.shape:  # one pass over the doubled batch: better device use
            _, out = vit_encode(self.backbone, torch.cat([prefix, prefix]), torch.cat([sub_a, sub_b]))
            return out.chunk(2)
        return vit_encode(self.backbone, prefix, sub_a)[1], vit_encode(self.backbone, prefix, sub_b)[1]

    def forward(self, x, ids_a, ids_b, restore_a, restore_b):
        """-> (logits of B's tokens from A, logits of A's tokens from B, desc_a, desc_b)."""
        enc_a, enc_b = self.encode(x, ids_a, ids_b)
        hid_a = self.decoder(enc_a, restore_a)  # A visible, mask tokens at B's positions
        hid_b = self.decoder(enc_b, restore_b)
        logits_b = self.decoder.pred(gather_rows(hid_a, ids_b)).flatten(0, 1)
        logits_a = self.decoder.pred(gather_rows(hid_b, ids_a)).flatten(0, 1)
        return logits_b, logits_a, hid_a.mean(dim=1), hid_b.mean(dim=1)


@register_method("splitmask")
class SplitMask(Method):
    config_class = SplitMaskConfig

    def __init__(self, cfg: SplitMaskConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        vit = mim_backbone(ctx, "splitmask")
        self.grid = vit_grid(vit)
        self.views = mim_views(cfg, vit, ctx.in_chans)
        self.tokenizer = mim_tokenizer(cfg, vit, ctx.in_chans)
        self.student = SplitMaskStudent(vit, self.grid, cfg.vocab_size, cfg.decoder_depth,
                                        cfg.decoder_dim, cfg.decoder_heads)
        self.seed = int(ctx.seed)

    def train_views(self) -> ViewSpec:
        return self.views

    def split(self, batch: dict[str, Any], step: int):
        """(ids_a, ids_b, restore_a, restore_b): subset B = the mask, A = its complement."""
        mask = mim_masks(self.cfg, self.grid, batch, step, self.seed)
        ids_a, ids_b, restore_a = mask_to_ids(mask)
        _, _, restore_b = mask_to_ids(~mask)
        return ids_a, ids_b, restore_a, restore_b

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        x = batch["views"][0]
        ids_a, ids_b, restore_a, restore_b = self.split(batch, step)
        tokens = self.tokenizer(x)
        logits_b, logits_a, desc_a, desc_b = self.student(x, ids_a, ids_b, restore_a, restore_b)
        loss_b, acc_b = masked_token_loss(logits_b, tokens.gather(1, ids_b).flatten())
        loss_a, acc_a = masked_token_loss(logits_a, tokens.gather(1, ids_a).flatten())
        mim = 0.5 * (loss_a + loss_b)
        nce = symmetric_info_nce(desc_a, desc_b, self.cfg.tau, self.ctx.equal_rank_batches)
        loss = mim + self.cfg.contrastive_weight * nce
        return {"loss": loss, "logs": {"mim_ce": mim.detach(), "info_nce": nce.detach(),
                                       "mim_acc": 0.5 * (acc_a + acc_b)}}

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
