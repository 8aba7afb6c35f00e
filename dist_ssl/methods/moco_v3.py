"""MoCo v3 (Chen, Xie & He, 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", Alg. 1).

The student is backbone + 3-layer projector + 2-layer predictor; the momentum encoder (the
``teacher``) is backbone + projector, updated with a momentum that follows a cosine from
``momentum`` to 1 over the run. The loss is symmetric: ``ctr(q1, k2) + ctr(q2, k1)`` where
``ctr`` contrasts each query with the keys of the GLOBAL batch (losses/info_nce.py).

Shapes: views 2 x [B, C, H, W]; q, k [2B, P] -> q1, q2, k1, k2 [B, P] (P = ``proj_dim``).

ViT stability trick (their Sec. 4.2): ``freeze_patch_embed`` keeps the randomly initialised
patch projection fixed (``requires_grad=False``: the optimizer and the gradient sync skip it).
The BN in the MLP heads (student and momentum teacher) normalises over the global batch in
multi-process runs, as MoCo v3's SyncBN (GlobalBatchNorm; ``parallel.global_batchnorm``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.step_schedules import cosine
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.losses.info_nce import global_info_nce
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.momentum import momentum_teacher, momentum_update_, teacher_forward
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.ssl_backbone import build_ssl_backbone
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim
from dist_ssl.methods.configs.moco_v3 import MoCoV3Config

__all__ = ["MoCoV3"]


@register_method("mocov3")
class MoCoV3(Method):
    config_class = MoCoV3Config

    def __init__(self, cfg: MoCoV3Config, ctx: MethodContext):
        super().__init__(cfg, ctx)
        backbone = build_ssl_backbone(ctx)
        if cfg.freeze_patch_embed:
            patch_embed = getattr(backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(f"freeze_patch_embed: {type(backbone).__name__} has no patch_embed")
            patch_embed.requires_grad_(False)
        projector = ProjectionMLP(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim,
                                  num_layers=cfg.proj_layers, norm=cfg.head_norm, last_norm=True)
        predictor = ProjectionMLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim,
                                  num_layers=cfg.pred_layers, norm=cfg.head_norm, last_norm=False)
        self.student = MultiCropWrapper(backbone, projector, predictor)
        self.teacher = momentum_teacher(self.student)  # backbone + projector, no predictor
        self.crop_size = cfg.crop_size or ctx.model.img_size or 224

    def train_views(self) -> ViewSpec:
        # BYOL's asymmetric augmentation, as MoCo v3: blur 1.0 / 0.1, solarize 0 / 0.2.
        size, scale = self.crop_size, tuple(self.cfg.crop_scale)
        return ViewSpec([CropGroup(1, size, scale, blur_p=1.0, solarize_p=0.0),
                         CropGroup(1, size, scale, blur_p=0.1, solarize_p=0.2)],
                        policy="dino", in_chans=self.ctx.in_chans)

    def momentum_at(self, step: int) -> float:
        """Momentum of the update after optimizer step ``step`` (1-based): cosine m0 -> 1."""
        return cosine(step - 1, self.ctx.total_steps, self.cfg.momentum, 1.0)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        views = batch["views"][:2]
        q1, q2 = self.student(views).chunk(2)               # [B, P] each, through the predictor
        k1, k2 = teacher_forward(self.teacher, views).chunk(2)
        t = self.cfg.temperature
        equal = self.ctx.equal_rank_batches
        loss = global_info_nce(q1, k2, t, equal) + global_info_nce(q2, k1, t, equal)
        return {"loss": loss, "logs": {"momentum": torch.tensor(self.momentum_at(step + 1))}}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        momentum_update_(self.teacher, self.student, self.momentum_at(step))

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
