"""Backbone factory over timm, plus a uniform token/grid view of any backbone's features.

Shapes: [B, C, H, W] images; [B, N, D] tokens (batch, tokens, dim); [B, D] pooled features;
(h, w) the final feature grid, so N = h * w for the spatial tokens.

Never downloads weights: every model is built with ``pretrained=False``; pre-trained
backbones are loaded from local files with ``dist_ssl.models.pos_embed.load_backbone_state``.
"""
import logging
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from dist_ssl.models.config import ModelConfig
from dist_ssl.models.names import resolve_backbone_name

from . import cvt, small_vit, t2t_vit  # noqa: F401  (register the small ViTs, T2T-ViT, CvT with timm)
from .vit_tokens import token_grid

__all__ = ["TokenOutput", "classifier_names", "create_backbone", "feature_dim", "forward_tokens"]

logger = logging.getLogger(__name__)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """Build a randomly initialised timm model (``.num_features`` = D) from ``cfg``."""
    cfg.validate()
    arch = resolve_backbone_name(cfg.name)
    kwargs: dict[str, Any] = dict(in_chans=cfg.in_chans, num_classes=cfg.num_classes)
    kwargs["drop_path_rate"] = cfg.drop_path
    fixed_size = timm.models.get_pretrained_cfg_value(arch, "fixed_input_size")
    if cfg.img_size is not None:
        if fixed_size:
            kwargs["img_size"] = cfg.img_size
        else:  # conv / PVT backbones take any resolution and have no img_size argument
            logger.debug("%s is size-agnostic; img_size=%s only affects the data", arch, cfg.img_size)
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.global_pool is not None:
        kwargs["global_pool"] = cfg.global_pool
    if cfg.dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    kwargs.update(cfg.extra)
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as err:  # timm's message names the argument the model class rejected
        raise ValueError(f"name: {arch} rejects an override ({err})") from err
    return model


def feature_dim(model: nn.Module) -> int:
    """D of the pooled features (``model.num_features`` for timm models)."""
    dim = getattr(model, "num_features", None)
    if dim is None:
        raise ValueError(f"{type(model).__name__} has no num_features; not a timm backbone?")
    return int(dim)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classification head(s), e.g. ('head',), ('fc',), ('head.fc',)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    # Fallback for models without a timm pretrained cfg: locate get_classifier() by identity.
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return (name,)
    return ()


class TokenOutput(NamedTuple):
    """Uniform output of :func:`forward_tokens`."""

    pooled: torch.Tensor  # [B, D] what the model's head would see (cls token or global pool)
    tokens: torch.Tensor  # [B, h*w, D] final spatial features in row-major order, no prefix tokens
    grid: tuple[int, int]  # (h, w) of the final feature map


def forward_tokens(model: nn.Module, x: torch.Tensor) -> TokenOutput:
    """Pooled features and the final spatial grid as tokens, for ViT/DeiT, T2T-ViT, CvT, Swin, PVT and ResNet.

    x: [B, C, H, W]. ViT ``forward_features`` gives [B, P + h*w, D] (P prefix tokens: cls,
    registers; T2T-ViT and CvT too, and they say their grid with ``feature_grid(img_size)``),
    Swin a [B, h, w, D] map (``output_fmt='NHWC'``), PVT/ResNet [B, D, h, w].
    """
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    if feats.ndim == 3:
        num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = feats[:, num_prefix:]
        grid = token_grid(model, x, tokens.shape[1])
    elif feats.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        grid = (feats.shape[1], feats.shape[2])
        tokens = feats.flatten(1, 2)
    elif feats.ndim == 4:
        grid = (feats.shape[2], feats.shape[3])
        tokens = feats.flatten(2).transpose(1, 2)
    else:
        raise ValueError(f"forward_tokens: unsupported feature shape {tuple(feats.shape)}")
    return TokenOutput(pooled, tokens, grid)
