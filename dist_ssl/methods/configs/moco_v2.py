"""``MoCoV2Config``: the ``method.*`` keys of MoCo v2 (methods/moco_v2.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["MoCoV2Config"]


@register_variant(MethodConfig, "mocov2")
@dataclass
class MoCoV2Config(MethodConfig):
    name: str = doc("mocov2", "training method")
    temperature: float = doc(0.2, "InfoNCE temperature (MoCo v2 / IDMM Table 10: 0.2)")
    queue_size: int = doc(2048, "K negative keys in the queue (IDMM Table 10: 2048; MoCo v2: 65536)")
    momentum: float = doc(0.999, "momentum of the key encoder update")
    proj_hidden_dim: int = doc(2048, "hidden width of the 2-layer MLP head")
    proj_dim: int = doc(128, "output dimension P of the MLP head")
    crop_size: Optional[int] = doc(None, "crop size; None = model.img_size")
    crop_scale: tuple[float, float] = doc((0.2, 1.0), "RandomResizedCrop area range (MoCo v2: 0.2-1)", interval=(0.0, 1.0))

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size: must be >= 1, got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum: must be in [0, 1], got {self.momentum}")
