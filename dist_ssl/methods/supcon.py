"""SupCon (Khosla et al., 2020, "Supervised Contrastive Learning").

SimCLR's setting (two views, backbone + projection MLP, global-batch contrast gathered with
gradient) with label-defined positives: every view of every image of the same class in the
GLOBAL batch is a positive (losses/supcon.py). Labels come from the shards' ``label`` field.

Shapes: views 2 x [B, C, H, W]; labels [B]; z1, z2 [B, P].
"""
from __future__ import annotations

from typing import Any

from dist_ssl.losses.supcon import supcon_loss
from dist_ssl.methods.base import MethodContext
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.configs.supcon import SupConConfig
from dist_ssl.methods.two_view_contrastive import TwoViewContrastive

__all__ = ["SupCon"]


@register_method("supcon")
class SupCon(TwoViewContrastive):
    """Same student, views and export as SimCLR; only the loss differs."""

    config_class = SupConConfig

    def __init__(self, cfg: SupConConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if ctx.num_classes < 2:
            raise ValueError(f"method.name: supcon needs labelled data, the manifest has "
                             f"{ctx.num_classes} class(es)")

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        z1, z2 = self.embed(batch)
        loss = supcon_loss([z1, z2], batch["label"], self.cfg.temperature, self.cfg.base_temperature,
                           self.ctx.equal_rank_batches)
        return {"loss": loss, "logs": {"supcon": loss.detach()}}
