"""``SupConConfig``: the ``method.*`` keys of SupCon (methods/supcon.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig
from dist_ssl.methods.configs.simclr import SimCLRConfig

__all__ = ["SupConConfig"]


@register_variant(MethodConfig, "supcon")
@dataclass
class SupConConfig(SimCLRConfig):
    name: str = doc("supcon", "training method")
    temperature: float = doc(0.1, "SupCon temperature (IDMM compares in SimCLR's setting: 0.1)")
    base_temperature: Optional[float] = doc(None, "T_base of the loss scale T / T_base; None = T (scale 1)")

    def validate(self) -> None:
        super().validate()
        if self.base_temperature is not None and self.base_temperature <= 0:
            raise ValueError(f"base_temperature: must be > 0 or null, got {self.base_temperature}")
