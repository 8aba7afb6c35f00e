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

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from dist_ssl.config.schema import doc
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.methods.base import Method, MethodConfig, MethodContext
from dist_ssl.methods.ssl_backbone import build_ssl_backbone
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim

__all__ = ["SimCLRConfig", "TwoViewContrastive", "two_view_encoder"]


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = doc("simclr", "training method")
    temperature: float = doc(0.1, "NT-Xent temperature (IDMM Table 10: 0.1)")
    projection: bool = doc(True, "a projection MLP on the backbone; False = NT-Xent on the backbone features "
                                 "(IDMM Table 9)")
    proj_hidden_dim: int = doc(2048, "hidden width of the projection MLP")
    proj_dim: int = doc(128, "output dimension P of the projection MLP")
    proj_layers: int = doc(2, "linear layers in the projection MLP (SimCLR v1: 2)")
    head_norm: Literal["bn", "none"] = doc("bn", "BatchNorm in the projection MLP (global over ranks, see parallel.global_batchnorm) or none")
    crop_size: Optional[int] = doc(None, "crop size; None = model.img_size")
    crop_scale: tuple[float, float] = doc((0.08, 1.0), "RandomResizedCrop area range", interval=(0.0, 1.0))

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.proj_layers < 1:
            raise ValueError(f"proj_layers: must be >= 1, got {self.proj_layers}")


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
