"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations").

Two augmented views per image go through one encoder (backbone + MLP projection head, the
``student``) and NT-Xent pulls the two projections of an image together against every other
projection of the GLOBAL batch (gathered across ranks with gradient: losses/info_nce.py).

Shapes: views 2 x [B, C, H, W]; z [2B, P] -> z1, z2 [B, P] (P = ``proj_dim``, or the
backbone's D without projection).

The projection head defaults to SimCLR's Linear-BN-ReLU-Linear. In multi-process runs its
BatchNorm normalises over the global batch (GlobalBatchNorm, as SimCLR's global BN across TPU
cores; tested equal to one process on the whole batch), unless ``parallel.global_batchnorm=false``.
``projection=false`` drops the head (an identity): NT-Xent then acts on the backbone's pooled
features, P = D, the IDMM paper's Table 9 row "SimCLR without proj. MLP".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.losses.info_nce import nt_xent
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.configs.simclr import SimCLRConfig
from dist_ssl.methods.moco_v2 import build_ssl_backbone
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim

__all__ = ["SimCLR"]


def two_view_encoder(ctx: MethodContext, cfg: SimCLRConfig) -> MultiCropWrapper:
    """backbone + projection MLP (or no head: ``projection=false``), the student of SimCLR and SupCon."""
    backbone = build_ssl_backbone(ctx)
    head: nn.Module = nn.Identity()
    if cfg.projection:
        head = ProjectionMLP(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim,
                             num_layers=cfg.proj_layers, norm=cfg.head_norm)
    return MultiCropWrapper(backbone, head)


@register_method("simclr")
class SimCLR(Method):
    config_class = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.student = two_view_encoder(ctx, cfg)
        self.crop_size = cfg.crop_size or ctx.model.img_size or 224

    def train_views(self) -> ViewSpec:
        return ViewSpec([CropGroup(2, self.crop_size, tuple(self.cfg.crop_scale))],
                        policy="simclr", in_chans=self.ctx.in_chans)

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections (z1, z2), each [B, P], from ONE student call on both views."""
        return self.student(batch["views"][:2]).chunk(2)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        z1, z2 = self.embed(batch)
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return {"loss": loss, "logs": {"nt_xent": loss.detach()}}

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
