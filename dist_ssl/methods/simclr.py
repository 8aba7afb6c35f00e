"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
Representations").

Two augmented views per image go through one encoder (backbone + MLP projection head, the
``student``) and NT-Xent pulls the two projections of an image together against every other
projection of the GLOBAL batch (gathered across ranks with gradient: losses/info_nce.py).

Shapes: views 2 x [B, C, H, W]; z [2B, P] -> z1, z2 [B, P] (P = ``proj_dim``, or the
backbone's D without projection).

The projection head defaults to SimCLR's Linear-BN-ReLU-Linear. In multi-process runs its
BatchNorm normalises over the global batch (GlobalBatchNorm, as SimCLR's global BN across TPU
cores; tested equal to one process on the whole batch), unless ``parallel.global_batchnorm=false``.
``projection=false`` drops the head (an identity): NT-Xent then acts on the backbone's pooled
features, P = D, the IDMM paper's Table 9 row "SimCLR without proj. MLP".
"""
from __future__ import annotations

from typing import Any

from dist_ssl.losses.info_nce import nt_xent
from dist_ssl.methods.registry import register_method
from dist_ssl.methods.configs.simclr import SimCLRConfig
from dist_ssl.methods.two_view_contrastive import TwoViewContrastive

__all__ = ["SimCLR"]


@register_method("simclr")
class SimCLR(TwoViewContrastive):
    config_class = SimCLRConfig

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        z1, z2 = self.embed(batch)
        loss = nt_xent(z1, z2, self.cfg.temperature, self.ctx.equal_rank_batches)
        return {"loss": loss, "logs": {"nt_xent": loss.detach()}}
