"""The headless backbone of the joint-embedding methods (SimCLR, SupCon, MoCo v2/v3, DINO)."""
from __future__ import annotations

import copy

from torch import nn

from dist_ssl.methods.base import MethodContext
from dist_ssl.models.factory import create_backbone

__all__ = ["build_ssl_backbone"]


def build_ssl_backbone(ctx: MethodContext, dynamic_img_size: bool = False) -> nn.Module:
    """Headless backbone (pooled [B, D] output) from the run's model config."""
    model_cfg = copy.deepcopy(ctx.model)
    model_cfg.num_classes = 0
    model_cfg.dynamic_img_size = model_cfg.dynamic_img_size or dynamic_img_size
    return create_backbone(model_cfg)
