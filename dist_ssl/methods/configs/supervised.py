"""``SupervisedConfig``: the ``method.*`` keys of supervised training and fine-tuning
(methods/supervised.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["SupervisedConfig"]


@register_variant(MethodConfig, "supervised")
@dataclass
class SupervisedConfig(MethodConfig):
    name: str = doc("supervised", "training method")
    crop_size: Optional[int] = doc(None, "training crop size; None = model.img_size")
    crop_scale: tuple[float, float] = doc((0.08, 1.0), "RandomResizedCrop area range", interval=(0.0, 1.0))
    policy: Literal["deit", "supervised"] = doc("deit", "base augmentation policy")
    randaugment: Optional[str] = doc(None, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1")
    random_erasing: float = doc(0.0, "random erasing probability (DeiT: 0.25)")
    mixup: float = doc(0.0, "mixup alpha; 0 = off (DeiT: 0.8)")
    cutmix: float = doc(0.0, "CutMix alpha; 0 = off (DeiT: 1.0)")
    mix_prob: float = doc(1.0, "probability of applying mixup or CutMix to a batch")
    mix_switch_prob: float = doc(0.5, "probability of CutMix instead of mixup when both are on")
    label_smoothing: float = doc(0.0, "label smoothing epsilon (DeiT: 0.1)")
    init_from: Optional[str] = doc(None, "backbone.safetensors (or a run dir with one) to fine-tune from")
    init_head: bool = doc(False, "with init_from: also load the classifier from the head.safetensors beside it "
                                 "(same class count; a 448 px continuation of a 224 px fine-tune); False = new head")
    drloc: bool = doc(False, "add the DRLoc auxiliary loss (Liu et al. 2021)")
    drloc_lambda: float = doc(0.1, "DRLoc loss weight (paper: 0.1 T2T/CvT-like, 0.5 Swin)")
    drloc_pairs: int = doc(64, "DRLoc position pairs sampled per image")
    drloc_grid: int = doc(7, "DRLoc: final grids larger than this are average-pooled to it")

    def validate(self) -> None:
        for key in ("random_erasing", "mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("mixup: alphas must be >= 0")
        if self.randaugment is not None and not self.randaugment.startswith("rand"):
            raise ValueError(f"randaugment: expected a timm spec like 'rand-m9-mstd0.5', got {self.randaugment!r}")
        if self.drloc_lambda < 0 or self.drloc_pairs < 1 or self.drloc_grid < 1:
            raise ValueError("drloc_lambda: need drloc_lambda >= 0, drloc_pairs >= 1, drloc_grid >= 1")
