"""``SimCLRConfig``: the ``method.*`` keys of SimCLR (methods/simclr.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["SimCLRConfig"]


@register_variant(MethodConfig, "simclr")
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
