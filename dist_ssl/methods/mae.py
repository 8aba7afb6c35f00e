"""MAE: masked autoencoder with an encoder that sees the visible patches only.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021): 75% of the patches are
dropped uniformly at random; the ViT encoder runs on the remaining 25%; a lightweight decoder
gets the encoded patches plus a shared mask token for every missing patch, un-shuffled back to
patch order (``ids_restore``) with fixed sin-cos position embeddings, and regresses the pixels of
every patch; the loss is the MSE on the masked patches of per-patch normalised pixels
(``norm_pix_loss``). Unlike MAE's code, the class token is not passed to the decoder (it carries
no position) and masks are drawn per sample from (mask_seed, step, instance id) (resume-exact).

Shapes: x [B, C, H, W]; mask [B, N] (True = masked); ids_keep [B, n_vis]; ids_restore [B, N];
pred / target [B, N, P] with P = C * p * p.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ssl.data.masking import make_masks, mask_to_ids
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.mim_decoder import MIMDecoder
from dist_ssl.losses.mim import masked_pixel_loss, pixel_targets
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.mim_common import mim_backbone
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.vit_tokens import encode_visible, vit_grid, vit_patch_size
from dist_ssl.methods.configs.mae import MAEConfig


class MAEStudent(nn.Module):
    """ViT encoder + MAE decoder: ``forward(x, ids_keep, ids_restore) -> pixels [B, N, P]``."""

    def __init__(self, backbone: nn.Module, cfg: MAEConfig, in_chans: int):
        super().__init__()
        self.backbone = backbone
        out_dim = in_chans * vit_patch_size(backbone) ** 2
        self.decoder = MIMDecoder(vit_grid(backbone), backbone.embed_dim, cfg.decoder_dim,
                                  cfg.decoder_depth, cfg.decoder_heads, out_dim)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        latent = encode_visible(self.backbone, x, ids_keep)
        return self.decoder.pred(self.decoder(latent, ids_restore))


@register_method("mae")
class MAE(Method):
    config_class = MAEConfig

    def __init__(self, cfg: MAEConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        vit = mim_backbone(ctx, "mae")
        self.grid, self.patch = vit_grid(vit), vit_patch_size(vit)
        size = int(vit.patch_embed.img_size[0])
        self.views = ViewSpec([CropGroup(1, size, tuple(cfg.crop_scale))], policy="supervised",
                              in_chans=ctx.in_chans)
        self.student = MAEStudent(vit, cfg, ctx.in_chans)
        self.seed = int(ctx.seed)

    def train_views(self) -> ViewSpec:
        return self.views

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        x = batch["views"][0]
        mask = make_masks("random", self.grid, self.cfg.mask_ratio, batch["index"].cpu(), step,
                          seed=self.seed + self.cfg.mask_seed).to(x.device)
        ids_keep, _, ids_restore = mask_to_ids(mask)
        pred = self.student(x, ids_keep, ids_restore)
        loss = masked_pixel_loss(pred, pixel_targets(x, self.patch, self.cfg.norm_pix_loss), mask)
        return {"loss": loss, "logs": {"mse": loss.detach()}}

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
