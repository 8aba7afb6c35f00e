"""ViT variants sized for 28-32 px images on CPU, registered with timm.

Importing this module registers the names below with ``timm.register_model`` so that
``timm.create_model(name)`` (and our factory) can build them like any timm model.
Each name has a pretrained cfg (no weights: url/hf_hub_id empty) so that
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
loads a local export; ``pretrained=True`` without a file raises instead of downloading.

All variants are plain timm ``VisionTransformer``s (ViT, Dosovitskiy et al. 2021) with a
class token, ``global_pool='token'``, mlp_ratio 4 and qkv bias; with patch 4 a 28 px image
gives a 7x7 grid (49 tokens), a 32 px image an 8x8 grid (64 tokens).

| name                 | img | patch | dim | depth | heads | params (headless) |
|----------------------|-----|-------|-----|-------|-------|-------------------|
| vit_pico_patch4_28   | 28  | 4     | 96  | 4     | 3     | 0.457 M           |
| vit_nano_patch4_28   | 28  | 4     | 192 | 6     | 3     | 2.69 M            |
| vit_nano_patch4_32   | 32  | 4     | 192 | 6     | 3     | 2.69 M            |

The pretrained cfg says ``num_classes=0``: built without ``num_classes`` these are headless
backbones whose forward returns pooled [B, D] features, which is what SSL pre-training wants.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["SMALL_VIT_ARGS", "small_vit_names"]

# Architecture kwargs per registered name; anything passed to create_model overrides them.
SMALL_VIT_ARGS: dict[str, dict[str, Any]] = {
    "vit_pico_patch4_28": dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3),
    "vit_nano_patch4_28": dict(img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit_nano_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
}


def _cfg(img_size: int) -> dict[str, Any]:
    # No url / hf_hub_id on purpose: timm must never try to download these. `input_size`
    # also gives timm the default in_chans/img_size, `classifier` tells it which keys to
    # drop when a file's head does not match, `first_conv` lets it adapt in_chans.
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    }


# register_model looks this name up in the decorated function's module.
default_cfgs = generate_default_cfgs(
    {name: _cfg(args["img_size"]) for name, args in SMALL_VIT_ARGS.items()}
)


def small_vit_names() -> list[str]:
    """Names of the registered small-image ViT variants."""
    return list(SMALL_VIT_ARGS)


def _create_small_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    model_args = {**SMALL_VIT_ARGS[variant], **kwargs}
    # Same builder timm uses for its own ViTs: checkpoint_filter_fn resamples pos_embed /
    # patch_embed when a loaded file was trained at another resolution or patch size.
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **model_args,
    )


@register_model
def vit_pico_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-pico/4 @ 28 px: dim 96, depth 4, heads 3; for unit/smoke tests."""
    return _create_small_vit("vit_pico_patch4_28", pretrained, **kwargs)


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-nano/4 @ 28 px: dim 192, depth 6, heads 3; Fashion-MNIST sized."""
    return _create_small_vit("vit_nano_patch4_28", pretrained, **kwargs)


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-nano/4 @ 32 px: dim 192, depth 6, heads 3; CIFAR sized."""
    return _create_small_vit("vit_nano_patch4_32", pretrained, **kwargs)
