"""``DINOConfig``: the ``method.*`` keys of DINO (methods/dino.py).

Torch-free: a recipe is loaded and validated with this module, without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dist_ssl.config.registry import register_variant
from dist_ssl.config.schema import doc
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["DINOConfig"]


@register_variant(MethodConfig, "dino")
@dataclass
class DINOConfig(MethodConfig):
    name: str = doc("dino", "training method")
    out_dim: int = doc(256, "K prototypes of the DINO head (IDMM comparison: 256; DINO: 65536)")
    hidden_dim: int = doc(2048, "hidden width of the head MLP")
    bottleneck_dim: int = doc(256, "bottleneck before the weight-normalised last layer")
    head_layers: int = doc(3, "MLP layers of the head before the last layer")
    norm_last_layer: bool = doc(True, "fix the last layer's weight-norm scale g to 1")
    student_temp: float = doc(0.1, "student softmax temperature")
    teacher_temp: float = doc(0.07, "teacher temperature after the warm-up")
    warmup_teacher_temp: float = doc(0.04, "teacher temperature at step 0")
    warmup_teacher_temp_epochs: float = doc(30.0, "linear teacher-temperature warm-up, in epochs")
    center_momentum: float = doc(0.9, "EMA momentum of the center")
    momentum: float = doc(0.996, "initial teacher momentum; cosine-increased to 1 over the run")
    freeze_last_layer_epochs: float = doc(1.0, "epochs with the head's last layer frozen")
    global_crop_size: Optional[int] = doc(None, "global crop size; None = model.img_size")
    global_crop_scale: tuple[float, float] = doc((0.4, 1.0), "global crops' area range", interval=(0.0, 1.0))
    local_crops: int = doc(8, "number L of local crops (0 = two global crops only)")
    local_crop_size: int = doc(96, "local crop size (DINO: 96 for 224 global crops)")
    local_crop_scale: tuple[float, float] = doc((0.05, 0.4), "local crops' area range", interval=(0.0, 1.0))

    def validate(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        for key in ("center_momentum", "momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.local_crops < 0:
            raise ValueError(f"local_crops: must be >= 0, got {self.local_crops}")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer_epochs < 0:
            raise ValueError("warmup_teacher_temp_epochs: epoch counts must be >= 0")
