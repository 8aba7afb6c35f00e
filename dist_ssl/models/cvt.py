"""CvT (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021), written
from the paper and registered with timm.

Three stages, each: a *convolutional token embedding* (overlapping strided conv + LayerNorm on
the previous stage's map: 7x7 stride 4, then 3x3 stride 2 twice -> 1/4, 1/8, 1/16 resolution),
then transformer blocks whose attention uses *convolutional projections*: q, k, v each from a
depthwise 3x3 conv + BatchNorm on the token map (stride 1 for q, 2 for k and v: 4x fewer
keys), followed by a linear layer. No position embedding (the convolutions carry position);
a class token only in the last stage, whose final norm feeds the head.

Faithful to the official code in three details that change numbers: BatchNorm in the
projections (so multi-process runs need global BatchNorm statistics, which the engine gives;
``parallel.global_batchnorm``), the attention scale ``dim ** -0.5`` of the whole stage width
(not of a head), and stochastic depth only in the last stage (CvT-13's DROP_PATH_RATE
[0, 0, 0.1]: ``drop_path_rate`` applies to the last stage, growing linearly over its blocks).
Module names follow the official release (``stage0.patch_embed.proj``, ``conv_proj_q.bn``,
``stage2.cls_token``, ``norm``, ``head``), so its checkpoints map key for key; its code builds
the MLPs with QuickGELU (x * sigmoid(1.702 x), from CLIP), which the paper does not mention:
``act_layer='quick_gelu'`` for those weights, GELU (as ViT and the HF port) by default.

Size-agnostic (no position table): any input size whose maps stay >= 1 cell; ``img_size`` is
only the nominal resolution in the pretrained cfg.

| name        | embed k/s/p         | dims         | depths   | heads   | params (1k classes) |
|-------------|---------------------|--------------|----------|---------|---------------------|
| cvt_13      | 7/4/2, 3/2/1, 3/2/1 | 64, 192, 384 | 1, 2, 10 | 1, 3, 6 | 20.0M               |
| cvt_pico_28 | 3/2/1, 3/2/1, 3/1/1 | 32, 64, 96   | 1, 1, 2  | 1, 2, 3 | 0.37M; CPU: 28 px -> 7x7 |

Shapes: x [B, C, H, W]; a stage's map [B, D_s, h, w] and tokens [B, P + h*w, D_s] (P = 1 with
the class token); forward_features -> [B, 1 + h*w, D] (final norm applied to every token).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_act_layer, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CvT", "ConvEmbed", "ConvAttention", "Block", "CVT_NAMES"]


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvEmbed(nn.Module):
    """Convolutional token embedding: [B, C, H, W] -> conv -> LayerNorm over channels -> [B, D, h, w]."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        b, c, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, c, h, w)


def _conv_projection(dim: int, kernel_size: int, padding: int, stride: int) -> nn.Sequential:
    """Depthwise conv + BatchNorm (the paper's 'dw_bn' projection); [B, D, h, w] -> [B, D, h', w']."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, bias=False, groups=dim)),
        ("bn", nn.BatchNorm2d(dim)),
    ]))


class ConvAttention(nn.Module):
    """Multi-head attention with convolutional q/k/v projections (official ``Attention``).

    forward(x [B, P + h*w, D], (h, w)) -> [B, P + h*w, D]; prefix tokens (the class token)
    skip the convolutions and join q, k and v unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size: int = 3, stride_kv: int = 2, stride_q: int = 1,
                 padding_kv: int = 1, padding_q: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim ** -0.5  # official CvT: the stage width, not the head width
        self.conv_proj_q = _conv_projection(dim, kernel_size, padding_q, stride_q)
        self.conv_proj_k = _conv_projection(dim, kernel_size, padding_kv, stride_kv)
        self.conv_proj_v = _conv_projection(dim, kernel_size, padding_kv, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, heads, T, D / heads]
        b, t, d = x.shape
        return x.reshape(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        h, w = grid
        prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        q, k, v = (torch.cat([prefix, proj(fmap).flatten(2).transpose(1, 2)], dim=1)
                   for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        y = y.transpose(1, 2).reshape(x.shape[0], -1, x.shape[2])
        return self.proj_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block with convolutional attention (official name ``Block``, so
    ``parallel.fsdp_wrap_classes=Block`` shards ViT, T2T-ViT and CvT blocks alike)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: str = "gelu",
                 **attn_kwargs: Any):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, attn_drop, drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=get_act_layer(act_layer), drop=drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid, num_prefix))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Conv token embedding + blocks (official ``VisionTransformer`` per stage).

    forward(x [B, C, H, W]) -> (map [B, D, h, w], class token [B, 1, D] or None).
    """

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch_size: int,
                 stride: int, padding: int, cls_token: bool, drop_path: Sequence[float],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, act_layer: str = "gelu"):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, stride, padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path[i], act_layer)
            for i in range(depth)])
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        p = 0
        if self.cls_token is not None:
            x, p = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1), 1
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, (h, w), p)
        cls = x[:, :p] if p else None
        return x[:, p:].transpose(1, 2).reshape(b, d, h, w), cls


class CvT(nn.Module):
    """Convolutional vision transformer (official ``ConvolutionalVisionTransformer``) with the
    timm model interface (forward_features -> [B, P + h*w, D], forward_head, reset_classifier)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: Optional[str] = None,
                 dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 num_heads: Sequence[int] = (1, 3, 6), patch_sizes: Sequence[int] = (7, 3, 3),
                 strides: Sequence[int] = (4, 2, 2), paddings: Sequence[int] = (2, 1, 1),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, cls_token: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, act_layer: str = "gelu",
                 dynamic_img_size: bool = True):
        super().__init__()
        self.num_stages = len(dims)
        if not all(len(s) == self.num_stages for s in (depths, num_heads, patch_sizes, strides, paddings)):
            raise ValueError("dims/depths/num_heads/patch_sizes/strides/paddings: one value per stage each")
        global_pool = global_pool or ("token" if cls_token else "avg")
        if global_pool not in ("token", "avg") or (global_pool == "token" and not cls_token):
            raise ValueError(f"global_pool: 'token' (needs cls_token) or 'avg', got {global_pool!r}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]
        self.num_prefix_tokens = 1 if cls_token else 0
        self.dynamic_img_size = True  # no position table: every input size works (flag accepted for timm)
        self.embed_specs = tuple(zip(patch_sizes, strides, paddings))
        chans = in_chans
        for i in range(self.num_stages):
            last = i == self.num_stages - 1
            dpr = torch.linspace(0, drop_path_rate, depths[i]).tolist() if last else [0.0] * depths[i]
            stage = CvTStage(chans, dims[i], depths[i], num_heads[i], patch_sizes[i], strides[i], paddings[i],
                             cls_token and last, dpr, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, act_layer)
            self.add_module(f"stage{i}", stage)  # official names: stage0, stage1, stage2
            chans = dims[i]
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @property
    def stages(self) -> list[CvTStage]:
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stage{self.num_stages - 1}.cls_token"} if self.num_prefix_tokens else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stage0\.patch_embed", blocks=[(r"^stage(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg") or (global_pool == "token" and not self.num_prefix_tokens):
                raise ValueError(f"global_pool: 'token' (needs the class token) or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def feature_grid(self, img_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of the last stage's map for an (H, W) input (forward_tokens / DRLoc read it)."""
        h, w = img_size
        for k, s, p in self.embed_specs:
            h, w = conv_out(h, k, s, p), conv_out(w, k, s, p)
        return h, w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        if cls is not None:
            tokens = torch.cat([cls, tokens], dim=1)
        # LayerNorm is per token: norm(cls) is what the official head sees; the grid tokens get
        # the same norm so DRLoc / dense uses read normalised features
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    # official 'trunc_norm' init: linear weights N(0, 0.02) truncated, zero biases; norms 1 / 0;
    # convolutions keep PyTorch's default
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


CVT_ARGS: dict[str, dict[str, Any]] = {
    "cvt_13": dict(dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    # CPU-sized: 3x3 embeddings with strides 2, 2, 1, so a 28 px image ends on a 7x7 grid (28 -> 14 ->
    # 7 -> 7; total stride 4 as vit_pico's patches; strides 1, 2, 2 cost 3x the CPU time)
    "cvt_pico_28": dict(dims=(32, 64, 96), depths=(1, 1, 2), num_heads=(1, 2, 3), patch_sizes=(3, 3, 3),
                        strides=(2, 2, 1), paddings=(1, 1, 1)),
}
CVT_NAMES = tuple(CVT_ARGS)


def _cfg(img_size: int, num_classes: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> dict:
    # No url: nothing may download. Not fixed-size: img_size is the nominal training resolution.
    return {"url": "", "num_classes": num_classes, "input_size": (3, img_size, img_size), "pool_size": None,
            "crop_pct": 0.875 if img_size == 224 else 1.0, "interpolation": "bicubic", "fixed_input_size": False,
            "mean": mean, "std": std, "first_conv": "stage0.patch_embed.proj", "classifier": "head",
            "license": "mit"}


default_cfgs = generate_default_cfgs({
    "cvt_13": _cfg(224, 1000),
    "cvt_pico_28": _cfg(28, 0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CvT:
    return build_model_with_cfg(CvT, variant, pretrained, **{**CVT_ARGS[variant], **kwargs})


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13: dims 64/192/384, depths 1/2/10, heads 1/3/6; 20M params, 4.5G FLOPs (paper) at 224 px."""
    return _create("cvt_13", pretrained, **kwargs)


@register_model
def cvt_pico_28(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-pico @ 28 px: dims 32/64/96, depths 1/1/2, heads 1/2/3; 28 px -> 7x7 grid; for CPU tests."""
    return _create("cvt_pico_28", pretrained, **kwargs)
