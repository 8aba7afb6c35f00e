"""``MAEConfig``: the ``method.*`` keys of MAE (methods/mae.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["MAEConfig"]


@register_variant(MethodConfig, "mae")
@dataclass
class MAEConfig(MethodConfig):
    name: str = doc("mae", "training method")
    crop_scale: tuple[float, float] = doc((0.2, 1.0), "RandomResizedCrop area range (MAE: 0.2-1)", interval=(0.0, 1.0))
    mask_ratio: float = doc(0.75, "fraction of patches masked, uniformly at random (MAE: 0.75)")
    mask_seed: int = doc(0, "seed of the per-sample masks (with the step and instance id)")
    norm_pix_loss: bool = doc(True, "regress per-patch normalised pixels (MAE's best setting)")
    decoder_dim: int = doc(512, "decoder width (MAE: 512)")
    decoder_depth: int = doc(8, "decoder blocks (MAE: 8)")
    decoder_heads: int = doc(16, "decoder attention heads (MAE: 16)")

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_heads: {self.decoder_heads} does not divide decoder_dim {self.decoder_dim}")
        if self.decoder_depth < 1:
            raise ValueError(f"decoder_depth: must be >= 1, got {self.decoder_depth}")
