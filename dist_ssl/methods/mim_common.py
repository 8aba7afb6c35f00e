"""What the masked-image-modeling methods share: config fields, backbone checks, tokenizer,
views and masks (BEiT and SplitMask use all of it, MAE the backbone).

Masks are drawn per sample from (mask_seed, step, instance id), so a resumed run repeats them
exactly (dist_ssl.data.masking). Shapes: x [B, C, H, W]; mask [B, N] (True = masked, N = h * w
patches).
"""
from __future__ import annotations


import torch
from torch import nn

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.masking import make_masks
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.methods.base import MethodContext
from dist_ssl.models.cvt import CVT_NAMES
from dist_ssl.models.factory import create_backbone, resolve_backbone_name
from dist_ssl.models.t2t_vit import T2T_VIT_NAMES
from dist_ssl.models.tokenizers import PatchTokenizer, build_tokenizer
from dist_ssl.models.vit_tokens import check_vit, vit_patch_size
from dist_ssl.methods.configs.beit import MIMConfig

__all__ = ["NOT_PLAIN_VIT", "check_plain_vit_name", "mim_backbone", "mim_masks", "mim_tokenizer",
           "mim_views"]


# Token mixers before or inside every block: masking one token of these does not hide its pixels
# (overlapping soft splits / conv embeddings and conv projections see the neighbours).
NOT_PLAIN_VIT = {**{n: "T2T-ViT (overlapping soft-split tokens mixed by T2T layers)" for n in T2T_VIT_NAMES},
                 **{n: "CvT (convolutional token embeddings and projections)" for n in CVT_NAMES}}


def check_plain_vit_name(name: str, method: str) -> None:
    """ConfigError (one line) for backbones MIM cannot mask: T2T-ViT and CvT."""
    arch = resolve_backbone_name(name)
    if arch in NOT_PLAIN_VIT:
        raise ConfigError("model.name", f"{method} masks the patch tokens of a plain ViT, but {arch} is a "
                          f"{NOT_PLAIN_VIT[arch]}: use a ViT/DeiT backbone (vit_small, deit_tiny, vit_pico) "
                          f"for {method}, or train {arch} with idmm or supervised (+ drloc)")


def mim_backbone(ctx: MethodContext, method: str) -> nn.Module:
    """A headless ViT from the run's model config (MIM pre-training has no classifier)."""
    model_cfg = ctx.model
    check_plain_vit_name(model_cfg.name, method)  # before building a model that cannot be used
    model_cfg.num_classes = 0
    vit = create_backbone(model_cfg)
    check_vit(vit, method)
    return vit


def mim_tokenizer(cfg: MIMConfig, vit: nn.Module, in_chans: int) -> PatchTokenizer:
    return build_tokenizer(cfg.tokenizer, cfg.vocab_size, vit_patch_size(vit), in_chans,
                           path=cfg.tokenizer_path, seed=cfg.tokenizer_seed)


def mim_views(cfg: MIMConfig, vit: nn.Module, in_chans: int) -> ViewSpec:
    """One random-resized, flipped crop at the ViT's resolution."""
    size = int(vit.patch_embed.img_size[0])
    return ViewSpec([CropGroup(1, size, tuple(cfg.crop_scale))], policy="supervised", in_chans=in_chans)


def mim_masks(cfg: MIMConfig, grid: tuple[int, int], batch: dict, step: int, seed: int) -> torch.Tensor:
    """[B, N] masks for the batch's instance ids at this step, on the batch's device."""
    mask = make_masks(cfg.mask, grid, cfg.mask_ratio, batch["index"].cpu(), step,
                      seed=seed + cfg.mask_seed, min_block=cfg.mask_min_block,
                      max_block=cfg.mask_max_block, aspect=cfg.mask_aspect)
    return mask.to(batch["views"][0].device)
