"""Backbone factory over timm, plus a uniform token/grid view of any backbone's features.

Shapes: [B, C, H, W] images; [B, N, D] tokens (batch, tokens, dim); [B, D] pooled features;
(h, w) the final feature grid, so N = h * w for the spatial tokens.

Never downloads weights: every model is built with ``pretrained=False``; pre-trained
backbones are loaded from local files with ``dist_ssl.models.pos_embed.load_backbone_state``.
"""
# No `from __future__ import annotations` here: the run-config system reads ModelConfig's
# field types via dataclasses.fields(), which must be real types, not strings.
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import timm
import torch
from torch import nn

from dist_ssl.config.registry import register_section

from . import cvt, small_vit, t2t_vit  # noqa: F401  (register the small ViTs, T2T-ViT, CvT with timm)
from .vit_tokens import token_grid

__all__ = [
    "BACKBONE_ALIASES",
    "ModelConfig",
    "TokenOutput",
    "available_backbones",
    "classifier_names",
    "create_backbone",
    "feature_dim",
    "forward_tokens",
    "resolve_backbone_name",
]

logger = logging.getLogger(__name__)

# Short names used in recipes -> timm architecture names. Any other timm name is accepted too.
BACKBONE_ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "pvt_v2_b0": "pvt_v2_b0",
    "pvt_v2_b1": "pvt_v2_b1",
    "pvt_v2_b2": "pvt_v2_b2",
    "pvt_v2_b3": "pvt_v2_b3",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "resnet50": "resnet50",
    "vit_pico": "vit_pico_patch4_28",
    "vit_nano": "vit_nano_patch4_28",
    **{name: name for name in small_vit.small_vit_names()},
    # T2T-ViT (Yuan et al. 2021) and CvT (Wu et al. 2021): dist_ssl.models.t2t_vit / cvt
    "t2t_vit_pico": "t2t_vit_pico_28",
    "cvt_pico": "cvt_pico_28",
    **{name: name for name in t2t_vit.T2T_VIT_NAMES + cvt.CVT_NAMES},
}


@dataclass
class ModelConfig:
    """Which backbone to build and how (read by the run config as ``model.*``)."""

    name: str = field(
        default="vit_nano_patch4_28",
        metadata={"help": "backbone: an alias (deit_tiny, swin_tiny, vit_nano, ...) or any timm model name"},
    )
    img_size: Optional[int] = field(
        default=None,
        metadata={"help": "input resolution for fixed-size models (ViT/Swin); None = the model default"},
    )
    patch_size: Optional[int] = field(
        default=None, metadata={"help": "patch size override for ViT/Swin; None = the model default"}
    )
    in_chans: int = field(default=3, metadata={"help": "number of input image channels"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth rate (last block)"})
    num_classes: int = field(
        default=0, metadata={"help": "classifier outputs; 0 = headless backbone returning pooled [B, D]"}
    )
    global_pool: Optional[str] = field(
        default=None, metadata={"help": "timm global_pool ('token', 'avg', ...); None = the model default"}
    )
    dynamic_img_size: bool = field(
        default=False,
        metadata={"help": "ViT only: accept any input size, resampling pos_embed per forward (multi-crop)"},
    )
    extra: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra keyword arguments passed to timm.create_model"}
    )

    def validate(self) -> None:
        """Raise ``ValueError("<field>: <message>")`` on the first invalid field."""
        resolve_backbone_name(self.name)
        for key in ("img_size", "patch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be a positive integer or None, got {value}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans: must be >= 1, got {self.in_chans}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path: must be in [0, 1), got {self.drop_path}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {self.num_classes}")
        if "pretrained" in self.extra:
            raise ValueError("extra: 'pretrained' is not allowed; load local files with load_backbone_state")


def available_backbones() -> list[str]:
    """Short names the factory knows (every timm name works as well)."""
    return sorted(BACKBONE_ALIASES)


def resolve_backbone_name(name: str) -> str:
    """Alias or timm name -> timm name; ValueError naming the nearest valid names otherwise."""
    if name in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name]
    if timm.is_model(name):
        return name
    near = difflib.get_close_matches(name, list(BACKBONE_ALIASES) + timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"name: unknown backbone {name!r}{hint}")


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


register_section("model", ModelConfig)
