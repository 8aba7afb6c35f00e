"""``OptimConfig``: the optimizer and lr-schedule settings (``optim.*``) that engine/optim.py and
engine/schedules.py build from. Torch-free, so loading a recipe does not import torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc

__all__ = ["OptimConfig"]


@dataclass
class OptimConfig:
    """Optimizer + warmup/cosine schedule settings. The absolute lr is derived, never hand-written."""

    name: Literal["adamw", "sgd"] = doc("adamw",
                                        "optimizer: adamw | sgd (momentum; weight decay as L2 on the gradient)")
    base_lr: float = doc(5e-4, "lr per 256 images; scaled by global batch / 256")
    lr: Optional[float] = doc(None, "absolute lr; overrides base_lr scaling")
    min_lr: float = doc(1e-6, "absolute lr at the end of the cosine decay")
    weight_decay: float = doc(0.05, "weight decay of >1-d weights (AdamW: decoupled; SGD: L2)")
    weight_decay_end: Optional[float] = doc(None, "cosine from weight_decay (step 0) to this (last step), "
                                            "DINO: 0.04 -> 0.4; None = constant")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW (beta1, beta2)")
    eps: float = doc(1e-8, "AdamW epsilon")
    momentum: float = doc(0.9, "SGD momentum (SimCLR / MoCo v2: 0.9)")
    nesterov: bool = doc(False, "SGD Nesterov momentum")
    layer_decay: Optional[float] = doc(None, "layer-wise lr decay for fine-tuning (e.g. 0.65); None = off")
    clip_grad: Optional[float] = doc(None, "max global grad norm; None = no clipping")
    warmup_epochs: Optional[float] = doc(None, "linear lr warmup length in epochs (set this or warmup_steps)")
    warmup_steps: Optional[int] = doc(None, "linear lr warmup length in optimizer steps (set this or warmup_epochs)")
    start_warmup_lr: float = doc(0.0, "absolute lr at step 0 of the warmup")
    schedule: Literal["cosine", "constant"] = doc("cosine", "lr shape after warmup: cosine | constant")
    extra_no_decay: tuple[str, ...] = doc((), "extra glob patterns of parameter names without weight decay")

    def validate(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"name: must be 'adamw' or 'sgd', got {self.name!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov: needs momentum > 0")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr: must be > 0, got {self.base_lr}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr: must be > 0 or null, got {self.lr}")
        if self.min_lr < 0:
            raise ValueError(f"min_lr: must be >= 0, got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise ValueError(f"weight_decay_end: must be >= 0 or null, got {self.weight_decay_end}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: need two values in [0, 1), got {self.betas}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad: must be > 0 or null, got {self.clip_grad}")
        if self.warmup_epochs is not None and self.warmup_steps is not None:
            raise ValueError("warmup_steps: set either warmup_epochs or warmup_steps, not both")
        if (self.warmup_epochs or 0) < 0 or (self.warmup_steps or 0) < 0:
            raise ValueError("warmup_steps: warmup length must be >= 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: must be 'cosine' or 'constant', got {self.schedule!r}")


register_section("optim", OptimConfig)
