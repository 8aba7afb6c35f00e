"""``MIMConfig``: the ``method.*`` keys of BEiT (methods/beit.py), shared by SplitMask's config.

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["MIMConfig"]


@register_variant(MethodConfig, "beit")
@dataclass
class MIMConfig(MethodConfig):
    """Fields shared by the token-predicting MIM methods (BEiT, SplitMask)."""

    name: str = doc("beit", "training method")
    crop_scale: tuple[float, float] = doc((0.08, 1.0), "RandomResizedCrop area range (BEiT: 0.08-1)", interval=(0.0, 1.0))
    tokenizer: Literal["random_projection", "random_patches", "kmeans"] = doc(
        "random_projection", "data-only tokenizer (El-Nouby et al. 2021, Sec. 3.2)")
    tokenizer_path: Optional[str] = doc(None, "codebook file from tools/fit_tokenizer.py (random_patches/kmeans)")
    vocab_size: int = doc(8192, "tokenizer vocabulary size V")
    tokenizer_seed: int = doc(0, "seed of the random-projection codebook (when no file is given)")
    mask: Literal["block", "random"] = doc("block", "BEiT block-wise or uniform random masking")
    mask_ratio: float = doc(0.4, "fraction of patches masked (BEiT: 75/196 ~ 0.4)")
    mask_min_block: int = doc(16, "block masking: minimum patches per block (BEiT: 16 of 14x14)")
    mask_max_block: Optional[int] = doc(None, "block masking: maximum patches per block; None = the masked count")
    mask_aspect: float = doc(0.3, "block masking: aspect ratios drawn in [a, 1/a]")
    mask_seed: int = doc(0, "seed of the per-sample masks (with the step and instance id)")

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.mask_min_block < 1 or (self.mask_max_block is not None and self.mask_max_block < 1):
            raise ValueError("mask_min_block: block sizes must be >= 1")
        if not 0.0 < self.mask_aspect <= 1.0:
            raise ValueError(f"mask_aspect: must be in (0, 1], got {self.mask_aspect}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        if self.tokenizer != "random_projection" and not self.tokenizer_path:
            raise ValueError(f"tokenizer_path: the {self.tokenizer} tokenizer needs a codebook file "
                             "(tools/fit_tokenizer.py)")
