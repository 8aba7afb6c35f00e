"""``SplitMaskConfig``: the ``method.*`` keys of SplitMask (methods/splitmask.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig
from dist_ssl.methods.configs.beit import MIMConfig

__all__ = ["SplitMaskConfig"]


@register_variant(MethodConfig, "splitmask")
@dataclass
class SplitMaskConfig(MIMConfig):
    name: str = doc("splitmask", "training method")
    mask_ratio: float = doc(0.5, "fraction of patches in subset B (A is the complement)")
    decoder_depth: int = doc(2, "decoder transformer blocks (paper: 2)")
    decoder_dim: Optional[int] = doc(None, "decoder width; None = the encoder width (paper)")
    decoder_heads: Optional[int] = doc(None, "decoder attention heads; None = the encoder's")
    tau: float = doc(0.2, "InfoNCE temperature (paper: 0.2)")
    contrastive_weight: float = doc(1.0, "weight of the InfoNCE term next to the inpainting loss")

    def validate(self) -> None:
        super().validate()
        if self.tau <= 0 or self.contrastive_weight < 0 or self.decoder_depth < 1:
            raise ValueError("tau: need tau > 0, contrastive_weight >= 0 and decoder_depth >= 1")
