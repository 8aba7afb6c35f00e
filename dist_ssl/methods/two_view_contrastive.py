"""What SimCLR and SupCon share: two views of every image through one student, contrasted over
the global batch.

SimCLR (Chen et al., 2020) and SupCon (Khosla et al., 2020) differ only in the loss (positives:
the other view of the same image, or every view of the same class): the config fields, the
student (backbone + projection MLP, or none), the views and the export are the same, so both
methods subclass :class:`TwoViewContrastive` and add their ``forward``.

Shapes: views 2 x [B, C, H, W]; z1, z2 [B, P] (P = ``proj_dim``, or the backbone's D without
projection).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.ssl_backbone import build_ssl_backbone
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim
from dist_ssl.methods.configs.simclr import SimCLRConfig

__all__ = ["TwoViewContrastive", "two_view_encoder"]


def two_view_encoder(ctx: MethodContext, cfg: SimCLRConfig) -> MultiCropWrapper:
    """backbone + projection MLP (or no head: ``projection=false``), the student of SimCLR and SupCon."""
    backbone = build_ssl_backbone(ctx)
    head: nn.Module = nn.Identity()
    if cfg.projection:
        head = ProjectionMLP(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim,
                             num_layers=cfg.proj_layers, norm=cfg.head_norm)
    return MultiCropWrapper(backbone, head)


class TwoViewContrastive(Method):
    """Student, views, embeddings and export of SimCLR and SupCon; subclasses add ``forward``."""

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

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
