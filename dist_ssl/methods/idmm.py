"""IDMM: parametric instance discrimination with multi-crop, CutMix and label smoothing.

Cao, Yu & Wu, "Training Vision Transformers with Only 2040 Images" (ECCV 2022). Each of the N
training images is its own class: a linear layer W [N, D] on the backbone's class token (no
projection head by default; the paper's Table 9 head is optional) is trained with soft-target
cross-entropy, the targets being CutMix mixes of *instance* ids smoothed by eps (paper: 0.1),
on multi-crop views at a small pre-training resolution (paper: 112 px, fine-tuned at 224).

W is a ``ShardedLinear``: each rank owns a contiguous range of the N classes, kept out of
data-parallel wrapping and gradient sync (``local_modules``), so ImageNet's N = 1.28M fits.

Crops and loss, as the official code does it: the views of one crop group (the 2 global crops;
the local crops) are concatenated into one batch [V_g * B, C, S, S]; CutMix draws once per group
(lam ~ Beta(0.5, 0.5) folded to max(lam, 1 - lam) as the official ``utils/mixup_utils.py:
cutmix_data`` does (``cutmix_fold``), one box, the partner a permutation of the group's rows on
this rank); the loss is the sum over groups of each group's mean cross-entropy over the global
batch (official: CE(global crops) + CE(local crops)). The student (backbone [+ head]) runs once
per step on all groups; groups of equal size share one backbone call.

Table 8 switches, each one key: ``label_smoothing`` (0 = off), ``small_resolution`` (off: every
crop AND the backbone's native size ``model.img_size`` x ``resolution_factor``, 112 -> 224, so
no other key needs changing), ``multi_crop``, ``cutmix``.

Shapes: views [B, C, S, S] per crop; x [V_g * B, C, S_g, S_g] per group; features [R, D] with
R = sum_g V_g * B rows of this rank.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import timm
import torch
from torch import nn

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.mixing import MixedBatch, cutmix_instances, mix_rng
from dist_ssl.data.views import ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.configs.idmm import IDMMConfig
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import create_backbone, feature_dim
from dist_ssl.models.names import resolve_backbone_name
from dist_ssl.parallel.sharded_fc import ShardedLinear
from dist_ssl.parallel.sharded_fc_gather import grad_scale

log = logging.getLogger(__name__)
GROUP_NAMES = ("global", "local")


def backbone_config(cfg: IDMMConfig, model_cfg):
    """The ModelConfig IDMM builds its backbone from: headless (pooled [B, D]), and with
    ``small_resolution`` off at ``resolution_factor`` x ``model.img_size`` like the crops, so
    Table 8's switch alone moves the whole pre-training to the larger resolution (a 224 px
    native grid, nothing to resample when fine-tuning at 224)."""
    out = dataclasses.replace(model_cfg, num_classes=0, extra=dict(model_cfg.extra))
    if not cfg.small_resolution and out.img_size is not None:
        out.img_size = round(out.img_size * cfg.resolution_factor)
    return out


def _check_crop_sizes(model_cfg, sizes: list[int]) -> None:
    """Fixed-size backbones (ViT, Swin) need dynamic_img_size for crops of another size."""
    arch = resolve_backbone_name(model_cfg.name)
    if not timm.models.get_pretrained_cfg_value(arch, "fixed_input_size") or model_cfg.dynamic_img_size:
        return
    native = model_cfg.img_size or (timm.models.get_pretrained_cfg_value(arch, "input_size") or (3, 224, 224))[-1]
    other = sorted({s for s in sizes if s != native})
    if other:
        raise ConfigError("model.dynamic_img_size", f"crops of {other} px differ from model.img_size={native}: "
                          "set model.dynamic_img_size=true (position embeddings resampled per size)")


@register_method("idmm")
class IDMM(Method):
    config_class = IDMMConfig

    def __init__(self, cfg: IDMMConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if ctx.num_samples < 2:
            raise ConfigError("data.train", f"IDMM needs at least 2 training images, the manifest has {ctx.num_samples}")
        groups = cfg.crop_groups()
        model_cfg = ctx.model = backbone_config(cfg, ctx.model)
        _check_crop_sizes(model_cfg, [g.size for g in groups])
        backbone = create_backbone(model_cfg)
        dim = feature_dim(backbone)
        head: nn.Module = nn.Identity()
        if cfg.projection:
            head, dim = ProjectionMLP(dim, cfg.proj_hidden_dim, cfg.proj_dim, num_layers=2), cfg.proj_dim
        # one data-parallel call per step on all crop groups; equal sizes share a backbone call
        self.student = MultiCropWrapper(backbone, head)
        self.seed = int(cfg.seed if cfg.seed is not None else ctx.seed)  # W's init + CutMix draws
        self.classifier = ShardedLinear(ctx.num_samples, dim, rank=ctx.rank, world_size=ctx.world_size,
                                        seed=self.seed, init_std=cfg.classifier_init_std,
                                        bias=cfg.classifier_bias)
        self.groups = groups
        self._ids_checked = False
        self._micro = (-1, 0)  # (step, micro-batches seen in it): CutMix draws per micro-batch
        log.info("IDMM: %d instances, D=%d, crops %s at model.img_size %s%s, CutMix %s; rank %d holds "
                 "classes [%d, %d)", ctx.num_samples, dim, [(g.count, g.size) for g in groups],
                 model_cfg.img_size, "" if cfg.small_resolution else f" (small_resolution off: x{cfg.resolution_factor})",
                 ("off" if not cfg.cutmix else f"alpha {cfg.cutmix_alpha}" + (", folded" if cfg.cutmix_fold else "")),
                 ctx.rank, self.classifier.shard_start, self.classifier.shard_start + self.classifier.n_local)

    # ------------------------------------------------------------------ data
    def train_views(self) -> ViewSpec:
        return ViewSpec(self.groups, policy=self.cfg.policy, in_chans=self.ctx.in_chans)

    # ------------------------------------------------------------------ one step
    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        index = batch["index"]
        if not self._ids_checked:
            self._check_ids(index)
        last, seen = self._micro
        micro = seen if last == step else 0
        self._micro = (step, micro + 1)
        return self.loss(self.mix(batch["views"], index, step, micro=micro))

    def mix(self, views: list[torch.Tensor], index: torch.Tensor, step: int, micro: int = 0,
            rank: Optional[int] = None) -> list[MixedBatch]:
        """Per crop group: its views concatenated [V_g * B, ...] and CutMixed with one draw seeded
        by (seed, rank, step, micro, group): a function of the global step, so resume is exact."""
        rank = self.ctx.rank if rank is None else rank
        out, i = [], 0
        for g, group in enumerate(self.groups):
            x = torch.cat(views[i:i + group.count]) if group.count > 1 else views[i]
            ids = index.to(x.device).repeat(group.count)
            alpha = self.cfg.cutmix_alpha if self.cfg.cutmix else 0.0
            out.append(cutmix_instances(x, ids, alpha, mix_rng(self.seed, rank, step, micro, g),
                                        fold=self.cfg.cutmix_fold))
            i += group.count
        return out

    def loss(self, groups: list[MixedBatch]) -> dict[str, Any]:
        """Sum over crop groups of the group's mean soft CE over the global batch."""
        feats = self.student([g.images for g in groups])
        # DDP/FSDP/ZeRO average backbone gradients over ranks while the sharded loss already
        # hands every rank the full gradient of its rows: undo the 1/P (the shard is not synced).
        feats = grad_scale(feats, self.ctx.world_size)
        total, logs = None, {}
        for name, g, f in zip(GROUP_NAMES, groups, feats.split([len(g.lam) for g in groups])):
            ce = self.classifier.loss(f, g.target_a, g.target_b, g.lam, smoothing=self.cfg.label_smoothing,
                                      chunk_size=self.cfg.logit_chunk, equal_batches=self.ctx.equal_rank_batches)
            total = ce if total is None else total + ce
            logs[f"ce_{name}"] = ce.detach()
        logs["lam"] = torch.cat([g.lam for g in groups]).mean().detach()
        return {"loss": total, "logs": logs}

    def _check_ids(self, index: torch.Tensor) -> None:
        n = self.classifier.num_classes
        lo, hi = int(index.min()), int(index.max())  # once: a device sync
        if lo < 0 or hi >= n:
            raise ValueError(f"IDMM: instance id {hi if hi >= n else lo} outside [0, {n}): the classifier "
                             f"has one class per image of data.train's manifest; remake the shards")
        self._ids_checked = True

    # ------------------------------------------------------------------ rank-local modules
    # checkpointed and re-sharded on another world size by the engine (parallel/rank_local.py)
    def local_modules(self) -> list[nn.Module]:
        return [self.classifier]

    def local_lr_scale(self) -> float:
        return float(self.cfg.classifier_lr_scale)

    # ------------------------------------------------------------------ outputs
    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
