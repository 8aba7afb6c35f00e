"""``IDMMConfig``: the ``method.*`` keys of IDMM (methods/idmm.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.data.views import CropGroup
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["IDMMConfig"]


@register_variant(MethodConfig, "idmm")
@dataclass
class IDMMConfig(MethodConfig):
    name: str = doc("idmm", "training method")
    global_crops: int = doc(2, "global crops per image")
    global_size: int = doc(112, "global crop size in pixels (paper: 112, half the fine-tuning size)")
    global_scale: tuple[float, float] = doc((0.14, 1.0), "RandomResizedCrop area range of global crops", interval=(0.0, 1.0))
    local_crops: int = doc(4, "local crops per image (used when multi_crop)")
    local_size: Optional[int] = doc(None, "local crop size; None = global_size (the official code: 112)")
    local_scale: tuple[float, float] = doc((0.05, 0.4), "RandomResizedCrop area range of local crops", interval=(0.0, 1.0))
    policy: Literal["simclr", "dino", "supervised"] = doc("simclr", "photometric policy: colour, blur, flip")
    blur_p: Optional[float] = doc(None, "Gaussian-blur probability override (tiny images: 0); None = policy's")
    multi_crop: bool = doc(True, "Table 8 switch: local crops on; False = global crops only")
    small_resolution: bool = doc(True, "Table 8 switch: False = every crop size and model.img_size x resolution_factor")
    resolution_factor: float = doc(2.0, "crop and model.img_size multiplier when small_resolution is off (112 -> 224; "
                                   "sizes rounded, e.g. 1.75: 16 -> 28)")
    cutmix: bool = doc(True, "Table 8 switch: CutMix on instance labels")
    cutmix_alpha: float = doc(0.5, "CutMix lam ~ Beta(alpha, alpha)")
    cutmix_fold: bool = doc(True, "lam = max(lam, 1 - lam): the patch covers at most half the image "
                                  "(official IDMM code, utils/mixup_utils.py cutmix_data); False = plain CutMix")
    label_smoothing: float = doc(0.1, "Table 8 switch: label smoothing epsilon over the N instances (0 = off)")
    projection: bool = doc(False, "Table 9: an MLP head (Linear-ReLU-Linear, no BN) before the classifier")
    proj_hidden_dim: int = doc(2048, "hidden width of the projection head")
    proj_dim: int = doc(256, "output width of the projection head (the classifier's D)")
    classifier_bias: bool = doc(False, "a bias per instance in the classifier")
    classifier_init_std: float = doc(0.02, "normal init std of W (same full W for any world size)")
    classifier_lr_scale: float = doc(1.0, "lr multiplier of W (paper: 1; each row is a target once per epoch)")
    logit_chunk: Optional[int] = doc(None, "global-batch logit rows per block (memory C x N/P); None = all")
    seed: Optional[int] = doc(None, "seed of W's init and the CutMix draws; None = the run seed")

    def validate(self) -> None:
        if self.global_crops < 1:
            raise ValueError(f"global_crops: must be >= 1, got {self.global_crops}")
        if self.local_crops < 0:
            raise ValueError(f"local_crops: must be >= 0, got {self.local_crops}")
        for key in ("global_size", "local_size", "resolution_factor", "proj_hidden_dim", "proj_dim",
                    "logit_chunk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.cutmix and self.cutmix_alpha <= 0:
            raise ValueError(f"cutmix_alpha: must be > 0 when cutmix is on, got {self.cutmix_alpha}")
        if self.blur_p is not None and not 0.0 <= self.blur_p <= 1.0:
            raise ValueError(f"blur_p: must be in [0, 1] or null, got {self.blur_p}")
        if self.classifier_lr_scale <= 0:
            raise ValueError(f"classifier_lr_scale: must be > 0, got {self.classifier_lr_scale}")
        if self.classifier_init_std <= 0:
            raise ValueError(f"classifier_init_std: must be > 0, got {self.classifier_init_std}")

    def crop_groups(self) -> list[CropGroup]:
        """The crop groups of the data, Table 8 switches applied (global first)."""
        factor = 1 if self.small_resolution else self.resolution_factor
        groups = [CropGroup(self.global_crops, round(self.global_size * factor), tuple(self.global_scale),
                            blur_p=self.blur_p)]
        if self.multi_crop and self.local_crops > 0:
            size = round((self.local_size or self.global_size) * factor)
            groups.append(CropGroup(self.local_crops, size, tuple(self.local_scale), blur_p=self.blur_p))
        return groups
