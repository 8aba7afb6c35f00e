"""``ModelConfig``: which backbone the factory (models/factory.py) builds, and how (``model.*``).

Torch-free, like every config module: loading a recipe does not import timm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc
from dist_ssl.models.names import resolve_backbone_name

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """Which backbone to build and how (read by the run config as ``model.*``)."""

    name: str = doc("vit_nano_patch4_28",
                    "backbone: an alias (deit_tiny, swin_tiny, vit_nano, ...) or any timm model name")
    img_size: Optional[int] = doc(None, "input resolution for fixed-size models (ViT/Swin); None = the model default")
    patch_size: Optional[int] = doc(None, "patch size override for ViT/Swin; None = the model default")
    in_chans: int = doc(3, "number of input image channels")
    drop_path: float = doc(0.0, "stochastic depth rate (last block)")
    num_classes: int = doc(0, "classifier outputs; 0 = headless backbone returning pooled [B, D]")
    global_pool: Optional[str] = doc(None, "timm global_pool ('token', 'avg', ...); None = the model default")
    dynamic_img_size: bool = doc(False,
                                 "ViT only: accept any input size, resampling pos_embed per forward (multi-crop)")
    extra: dict[str, Any] = doc({}, "extra keyword arguments passed to timm.create_model")

    def validate(self) -> None:
        """Raise ``ValueError("<field>: <message>")`` on the first invalid field."""
        resolve_backbone_name(self.name)
        for key in ("img_size", "patch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be a positive integer or None, got {value}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans: must be >= 1, got {self.in_chans}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path: must be in [0, 1), got {self.drop_path}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {self.num_classes}")
        if "pretrained" in self.extra:
            raise ValueError("extra: 'pretrained' is not allowed; load local files with load_backbone_state")


register_section("model", ModelConfig)
