"""SupCon (Khosla et al., 2020, "Supervised Contrastive Learning").

SimCLR's setting (two views, backbone + projection MLP, global-batch contrast gathered with
gradient) with label-defined positives: every view of every image of the same class in the
GLOBAL batch is a positive (losses/supcon.py). Labels come from the shards' ``label`` field.

Shapes: views 2 x [B, C, H, W]; labels [B]; z1, z2 [B, P].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dist_ssl.config.schema import doc
from dist_ssl.losses.supcon import supcon_loss
from dist_ssl.methods.base import MethodContext
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.two_view_contrastive import SimCLRConfig, TwoViewContrastive

__all__ = ["SupCon", "SupConConfig"]


@dataclass
class SupConConfig(SimCLRConfig):
    name: str = doc("supcon", "training method")
    temperature: float = doc(0.1, "SupCon temperature (IDMM compares in SimCLR's setting: 0.1)")
    base_temperature: Optional[float] = doc(None, "T_base of the loss scale T / T_base; None = T (scale 1)")

    def validate(self) -> None:
        super().validate()
        if self.base_temperature is not None and self.base_temperature <= 0:
            raise ValueError(f"base_temperature: must be > 0 or null, got {self.base_temperature}")


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
