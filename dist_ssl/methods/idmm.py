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
from dataclasses import dataclass
from typing import Any, Literal, Optional

import timm
import torch
from torch import nn

from dist_ssl.config.errors import ConfigError
from dist_ssl.config.schema import doc
from dist_ssl.data.mixing import MixedBatch, cutmix_instances, mix_rng
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.methods.base import Method, MethodConfig, MethodContext
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.factory import create_backbone, feature_dim, resolve_backbone_name
from dist_ssl.parallel.sharded_fc import ShardedLinear, grad_scale

log = logging.getLogger(__name__)
GROUP_NAMES = ("global", "local")


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
                                      chunk_size=self.cfg.logit_chunk)
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
