"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation with no labels: the student (backbone + DINO head) sees 2 global and L local
crops, the EMA teacher only the 2 global crops; the student matches the teacher's centred,
sharpened output distribution on every other crop (losses/dino.py).

Shapes: views 2 x [B, C, G, G] then L x [B, C, l, l]; student out [(2+L)B, K], teacher out
[2B, K] (K = ``out_dim``: DINO used 65,536, the IDMM comparison 256).

Schedules (functions of the global optimizer step): teacher momentum cosine ``momentum`` -> 1,
teacher temperature linear ``warmup_teacher_temp`` -> ``teacher_temp`` over
``warmup_teacher_temp_epochs``, then constant; the head's last layer is frozen for
``freeze_last_layer_epochs``.

Data parallelism: the center [1, K] is averaged over the teacher outputs of ALL ranks (one
all-reduce per step in ``after_step``), so it is the same on every rank and matches a single
process on the global batch; the teacher is a plain submodule updated from the wrapped
student; teacher and center are method state (checkpointed, restored). Local crops smaller
than the model's resolution need a ViT built with ``dynamic_img_size`` (switched on here).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.step_schedules import cosine, linear_warmup_then_constant
from dist_ssl.heads.dino_head import DINOHead
from dist_ssl.heads.projection import MultiCropWrapper
from dist_ssl.losses.dino import DINOLoss
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.momentum import momentum_teacher, momentum_update_, teacher_forward
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.ssl_backbone import build_ssl_backbone
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim
from dist_ssl.methods.configs.dino import DINOConfig

__all__ = ["DINO"]


@register_method("dino")
class DINO(Method):
    config_class = DINOConfig

    def __init__(self, cfg: DINOConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.global_size = cfg.global_crop_size or ctx.model.img_size or 224
        sizes = {self.global_size} | ({cfg.local_crop_size} if cfg.local_crops else set())
        backbone = build_ssl_backbone(ctx, dynamic_img_size=sizes != {ctx.model.img_size})
        head = DINOHead(feature_dim(backbone), cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        cfg.head_layers, norm_last_layer=cfg.norm_last_layer)
        self.student = MultiCropWrapper(backbone, head)
        self.teacher = momentum_teacher(self.student)
        self.loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        # sum [K] and row count of this step's teacher outputs, folded into the center in after_step
        self._center_sum: Optional[torch.Tensor] = None
        self._center_count = 0

    def train_views(self) -> ViewSpec:
        g, scale = self.global_size, tuple(self.cfg.global_crop_scale)
        groups = [CropGroup(1, g, scale, blur_p=1.0), CropGroup(1, g, scale, blur_p=0.1, solarize_p=0.2)]
        if self.cfg.local_crops:
            groups.append(CropGroup(self.cfg.local_crops, self.cfg.local_crop_size,
                                    tuple(self.cfg.local_crop_scale), blur_p=0.5))
        return ViewSpec(groups, policy="dino", in_chans=self.ctx.in_chans)

    def _steps(self, epochs: float) -> int:
        return int(round(epochs * self.ctx.steps_per_epoch))

    def teacher_temp_at(self, step: int) -> float:
        """Teacher temperature at 0-based optimizer step ``step``."""
        return linear_warmup_then_constant(step, self._steps(self.cfg.warmup_teacher_temp_epochs),
                                           self.cfg.teacher_temp, self.cfg.warmup_teacher_temp)

    def momentum_at(self, step: int) -> float:
        """Teacher momentum of the update after optimizer step ``step`` (1-based)."""
        return cosine(step - 1, self.ctx.total_steps, self.cfg.momentum, 1.0)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        views = batch["views"]
        b = views[0].shape[0]
        unwrap_model(self.student).head.freeze_last_layer = step < self._steps(self.cfg.freeze_last_layer_epochs)
        student_out = self.student(views).split(b)          # 2 + L tensors [B, K]
        teacher_out = teacher_forward(self.teacher, views[:2])  # [2B, K], float32
        temp = self.teacher_temp_at(step)
        loss = self.loss(student_out, teacher_out.split(b), temp)
        rows_sum = teacher_out.sum(0)
        self._center_sum = rows_sum if self._center_sum is None else self._center_sum + rows_sum
        self._center_count += teacher_out.shape[0]
        return {"loss": loss, "logs": {"teacher_temp": torch.tensor(temp)}}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self._center_sum is not None:  # collective: every rank ran the same micro-batches
            self.loss.update_center(self._center_sum, self._center_count)
            self._center_sum, self._center_count = None, 0
        momentum_update_(self.teacher, self.student, self.momentum_at(step))

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
