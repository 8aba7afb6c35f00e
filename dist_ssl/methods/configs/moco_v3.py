"""``MoCoV3Config``: the ``method.*`` keys of MoCo v3 (methods/moco_v3.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["MoCoV3Config"]


@register_variant(MethodConfig, "mocov3")
@dataclass
class MoCoV3Config(MethodConfig):
    name: str = doc("mocov3", "training method")
    temperature: float = doc(0.2, "contrastive temperature (MoCo v3 ViT / IDMM Table 10: 0.2)")
    momentum: float = doc(0.99, "initial momentum; cosine-increased to 1 over the run")
    proj_hidden_dim: int = doc(4096, "hidden width of projector and predictor")
    proj_dim: int = doc(256, "output dimension P of projector and predictor")
    proj_layers: int = doc(3, "projector layers (MoCo v3: 3)")
    pred_layers: int = doc(2, "predictor layers (MoCo v3: 2)")
    head_norm: Literal["bn", "none"] = doc("bn", "BatchNorm in projector/predictor (global over ranks, see parallel.global_batchnorm) or none")
    freeze_patch_embed: bool = doc(True, "keep the random patch projection fixed (ViT stability trick)")
    crop_size: Optional[int] = doc(None, "crop size; None = model.img_size")
    crop_scale: tuple[float, float] = doc((0.08, 1.0), "RandomResizedCrop area range", interval=(0.0, 1.0))

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum: must be in [0, 1], got {self.momentum}")
        if self.proj_layers < 1 or self.pred_layers < 1:
            raise ValueError("proj_layers: projector and predictor need >= 1 layer each")
