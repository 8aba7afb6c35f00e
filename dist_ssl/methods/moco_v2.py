"""MoCo v2 (He et al., 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning"; Chen et al., 2020, "Improved Baselines with Momentum Contrastive Learning").

A query encoder (backbone + 2-layer MLP, the ``student``) is trained with InfoNCE against the
key of another view from a momentum encoder (the ``teacher``) and a queue of K earlier keys.

Shapes: views 2 x [B, C, H, W]; q, k [B, P] (P = ``proj_dim``); queue [K, P].

Data parallelism:
- the queue is a buffer that is the SAME on every rank: each step's keys of ALL ranks are
  gathered (rank order) and enqueued everywhere, so it holds the global batch's keys, as in
  MoCo's ``concat_all_gather``; it is initialised from the seeded RNG, identical on all ranks;
- the teacher is a plain submodule, never wrapped or optimized; ``after_step`` updates it from
  the (possibly DDP / FSDP2 / ZeRO-1/2 wrapped) student, matched by parameter name;
- queue, queue pointer and teacher are in ``extra_state_dict`` (checkpointed, restored).
Keys of a step are enqueued in ``after_step``, i.e. after every micro-batch of the step used the
old queue (MoCo enqueues at the end of each forward; identical without gradient accumulation).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.losses.info_nce import queue_info_nce
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.momentum import momentum_teacher, momentum_update_, teacher_forward
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.ssl_backbone import build_ssl_backbone
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import feature_dim
from dist_ssl.parallel.collectives import all_gather_cat
from dist_ssl.methods.configs.moco_v2 import MoCoV2Config

__all__ = ["MoCoV2"]


@register_method("mocov2")
class MoCoV2(Method):
    config_class = MoCoV2Config

    def __init__(self, cfg: MoCoV2Config, ctx: MethodContext):
        super().__init__(cfg, ctx)
        backbone = build_ssl_backbone(ctx)
        head = ProjectionMLP(feature_dim(backbone), cfg.proj_hidden_dim, cfg.proj_dim, num_layers=2)
        self.student = MultiCropWrapper(backbone, head)
        self.teacher = momentum_teacher(self.student)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.crop_size = cfg.crop_size or ctx.model.img_size or 224
        self._pending: list[torch.Tensor] = []  # this step's local keys, enqueued in after_step

    def train_views(self) -> ViewSpec:
        # MoCo v2's augmentation: jitter (0.4, 0.4, 0.4, 0.1) p=0.8, gray 0.2, blur p=0.5, flip;
        # the "dino" policy's jitter is (0.4, 0.4, 0.2, 0.1), the closest one we have.
        return ViewSpec([CropGroup(2, self.crop_size, tuple(self.cfg.crop_scale), blur_p=0.5)],
                        policy="dino", in_chans=self.ctx.in_chans)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        views = batch["views"]
        q = self.student(views[:1])                         # [B, P] queries of view 0
        k = teacher_forward(self.teacher, views[1:2])       # [B, P] keys of view 1
        loss = queue_info_nce(q, k, self.queue, self.cfg.temperature)
        self._pending.append(F.normalize(k, dim=1))
        return {"loss": loss, "logs": {"info_nce": loss.detach()}}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        momentum_update_(self.teacher, self.student, self.cfg.momentum)
        if self._pending:  # collective: every rank has run the same number of micro-batches
            keys = all_gather_cat(torch.cat(self._pending))   # [M, P], rank order
            self._pending.clear()
            self.enqueue(keys)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write [M, P] keys at the pointer, wrapping around (the newest K if M > K)."""
        k = self.queue.shape[0]
        keys = keys[-k:].to(self.queue.dtype)
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % k
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + keys.shape[0]) % k)

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
