"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", ICCV 2021), written from the paper and registered with timm.

Tokens-to-token module (Sec. 3.1): a *soft split* (``nn.Unfold``: overlapping k x k windows
flattened into tokens) 7x7 stride 4, a small T2T layer, a re-structurization back to an image,
a 3x3 stride 2 soft split, a second T2T layer, a last 3x3 stride 2 soft split and a linear
projection to the backbone width: 224 px -> 56 -> 28 -> 14 x 14 tokens. Then a plain ViT
backbone (class token, pre-norm blocks with qkv_bias=False, final norm, head on the class token).

T2T layer: the *token performer* by default (``tokens_type='performer'``), as the official
T2T-ViT-7/14 checkpoints and the paper's 4.3M / 1.1G-MACs and 21.5M / 4.8G-MACs numbers use:
one head, linear attention through positive random features (Performer, Choromanski et al.
2021; kernel ratio 0.5 -> m = token_dim / 2 fixed random projections, kept as a buffer ``w``
so checkpoints carry them), the value as the skip connection (the token width changes), and a
token_dim MLP. ``tokens_type='transformer'`` is the T2T-ViT_t variant (full one-head attention
over the 3,136 tokens of a 224 px image: the same weights less the qkv biases, 6.1G MACs for
T2T-ViT_t-14 instead of 4.8G -- the paper's numbers, benchmarks/model_flops.py). The official
performers apply dropout 0.1 to their attention output and MLP whatever the backbone's drop
rate, the token transformers none (``t2t_drop_rate`` overrides either; None = official).

Position embedding: the fixed 1-D sinusoid table of the paper's code over the 1 + h*w positions
(class token first, grid row-major), a non-persistent buffer: not learned, not in the state
dict, regenerated for any grid -- a model built (or loaded) at 112, 224 or 448 px has exactly
the table the official code builds at that size, with nothing to resample. The official code
stores the table as a frozen ``nn.Parameter``; the papers' parameter counts include it (and the
performers' ``w``): T2T-ViT-14 21.47M trainable + 0.08M table = 21.5M.

| name            | img | soft split k/s/p    | dim | depth | heads | mlp | token_dim | params (1k cls, trainable) |
|-----------------|-----|---------------------|-----|-------|-------|-----|-----------|----------------------------|
| t2t_vit_7       | 224 | 7/4/2, 3/2/1, 3/2/1 | 256 | 7     | 4     | 2   | 64        | 4.26M (+0.05M fixed = 4.31M) |
| t2t_vit_14      | 224 | 7/4/2, 3/2/1, 3/2/1 | 384 | 14    | 6     | 3   | 64        | 21.47M (+0.08M fixed = 21.55M) |
| t2t_vit_pico_28 | 28  | 3/2/1, 3/2/1, 3/1/1 | 96  | 4     | 3     | 2   | 32        | 0.46M; CPU: 28 px -> 7x7 grid |

Shapes: x [B, C, H, W]; tokens [B, N, D] (N = h * w); sequence [B, 1 + N, D] (class token first).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["T2TViT", "T2TModule", "TokenPerformer", "TokenTransformer", "T2T_VIT_NAMES", "sinusoid_table"]


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """[1, n_position, dim] fixed 1-D sinusoid table (Vaswani et al. 2017), as T2T-ViT's
    ``get_sinusoid_encoding``: sin on even channels, cos on odd, computed in float64."""
    pos = torch.arange(n_position, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution / unfold along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


class TokenPerformer(nn.Module):
    """Token performer T2T layer: [B, T, dim] -> [B, T, in_dim] (official ``Token_performer``).

    Attention is softmax-kernel attention approximated with m positive random features
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) (FAVOR+), linear in T: y = phi(q) (phi(k)^T v) /
    (phi(q) sum_t phi(k_t)). The random features ``w`` [m, in_dim] are orthogonal rows scaled by
    sqrt(m) and never trained. Computed in float32 (at least) even under autocast: exp overflows bf16.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.epsilon = 1e-8  # keeps the normaliser away from 0
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(drop))
        self.m = int(in_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, in_dim)) * math.sqrt(self.m)
        self.register_buffer("w", w)  # fixed random features: saved, so a checkpoint is exact

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, in_dim] -> positive random features [B, T, m]."""
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        wtx = x @ self.w.to(x.dtype).t()
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # official order: k, q, v
        dtype = torch.promote_types(v.dtype, torch.float32)  # float32 at least (float64 stays)
        with torch.autocast(device_type=x.device.type, enabled=False):
            k, q, vf = k.to(dtype), q.to(dtype), v.to(dtype)
            kp, qp = self.prm_exp(k), self.prm_exp(q)  # [B, T, m]
            denom = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)  # [B, T, 1]
            kptv = torch.einsum("btn,btm->bnm", vf, kp)  # [B, in_dim, m]
            y = torch.einsum("btm,bnm->btn", qp, kptv) / (denom + self.epsilon)  # [B, T, in_dim]
        # the value is the skip connection: the token width changes from dim to in_dim
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """One-head attention dim -> in_dim with the value as skip connection (T2T-ViT_t)."""

    def __init__(self, dim: int, in_dim: int, drop: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5  # official: head_dim of the *input* width (one head)
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=False)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, T, in_dim] each
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return v + self.proj_drop(self.proj(y))


class TokenTransformer(nn.Module):
    """Token transformer T2T layer (official ``Token_transformer``, mlp_ratio 1): [B, T, dim] -> [B, T, in_dim]."""

    def __init__(self, dim: int, in_dim: int, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim, drop)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential()  # named fc1/act/fc2 as the official timm Mlp
        self.mlp.add_module("fc1", nn.Linear(in_dim, in_dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(in_dim, in_dim))
        self.mlp.add_module("drop", nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft split -> T2T layer -> soft split -> T2T layer -> soft split -> Linear.

    forward(x [B, C, H, W]) -> (tokens [B, h*w, embed_dim], (h, w)).
    """

    def __init__(self, in_chans: int, embed_dim: int, token_dim: int, tokens_type: str = "performer",
                 kernels: Sequence[int] = (7, 3, 3), strides: Sequence[int] = (4, 2, 2),
                 paddings: Sequence[int] = (2, 1, 1), drop: Optional[float] = None):
        super().__init__()
        self.splits = tuple(zip(kernels, strides, paddings))
        if len(self.splits) != 3:
            raise ValueError(f"t2t kernels/strides/paddings: need 3 soft splits each, got {self.splits}")
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.splits
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        if tokens_type == "performer":
            drop = 0.1 if drop is None else drop  # hard-coded 0.1 in the official Token_performer
            self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim, kernel_ratio=0.5, drop=drop)
            self.attention2 = TokenPerformer(token_dim * k1 * k1, token_dim, kernel_ratio=0.5, drop=drop)
        elif tokens_type == "transformer":
            drop = 0.0 if drop is None else drop  # the official Token_transformer: no dropout
            self.attention1 = TokenTransformer(in_chans * k0 * k0, token_dim, drop=drop)
            self.attention2 = TokenTransformer(token_dim * k1 * k1, token_dim, drop=drop)
        else:
            raise ValueError(f"tokens_type: 'performer' or 'transformer', got {tokens_type!r}")
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)

    def grid(self, img_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of the output tokens for an (H, W) image."""
        h, w = img_size
        for k, s, p in self.splits:
            h, w = conv_out(h, k, s, p), conv_out(w, k, s, p)
        return h, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.splits
        x = self.soft_split0(x).transpose(1, 2)  # [B, h0*w0, C*k0*k0]
        h, w = conv_out(h, k0, s0, p0), conv_out(w, k0, s0, p0)
        x = self.attention1(x)  # [B, h0*w0, token_dim]
        x = self.soft_split1(x.transpose(1, 2).reshape(x.shape[0], -1, h, w)).transpose(1, 2)
        h, w = conv_out(h, k1, s1, p1), conv_out(w, k1, s1, p1)
        x = self.attention2(x)
        x = self.soft_split2(x.transpose(1, 2).reshape(x.shape[0], -1, h, w)).transpose(1, 2)
        h, w = conv_out(h, k2, s2, p2), conv_out(w, k2, s2, p2)
        return self.project(x), (h, w)


class T2TViT(nn.Module):
    """Tokens-to-token module + ViT backbone; the timm model interface (forward_features ->
    [B, 1 + N, D], forward_head, reset_classifier, no_weight_decay, ...)."""

    def __init__(self, img_size: Any = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, tokens_type: str = "performer",
                 token_dim: int = 64, t2t_kernels: Sequence[int] = (7, 3, 3),
                 t2t_strides: Sequence[int] = (4, 2, 2), t2t_paddings: Sequence[int] = (2, 1, 1),
                 t2t_drop_rate: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dynamic_img_size: bool = False):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: 'token' or 'avg', got {global_pool!r}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.img_size = to_2tuple(img_size)
        self.tokens_to_token = T2TModule(in_chans, embed_dim, token_dim, tokens_type, t2t_kernels,
                                         t2t_strides, t2t_paddings, drop=t2t_drop_rate)
        self.grid_size = self.tokens_to_token.grid(self.img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        n = 1 + self.grid_size[0] * self.grid_size[1]
        self.register_buffer("pos_embed", sinusoid_table(n, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows per block
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    # ------------------------------------------------------------------ timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|tokens_to_token", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool: 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def feature_grid(self, img_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) token grid for an (H, W) input (forward_tokens / DRLoc read it)."""
        return self.tokens_to_token.grid(tuple(img_size))

    def _pos_embed(self, grid: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
        if grid == tuple(self.grid_size):
            return self.pos_embed.to(ref.dtype)
        if not self.dynamic_img_size:
            raise ValueError(f"T2T-ViT built for {self.img_size[0]}x{self.img_size[1]} px (grid {self.grid_size}) "
                             f"got a {grid} token grid; build it at that img_size or with dynamic_img_size=True")
        # the fixed table of this grid, as the paper's code builds it at that image size
        return sinusoid_table(1 + grid[0] * grid[1], self.embed_dim).to(ref.device, ref.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.tokens_to_token(x)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x + self._pos_embed(grid, x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)  # [B, 1 + N, D]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    # official T2T-ViT: truncated normal(0.02) linear weights, zero biases, LayerNorm 1 / 0
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: dict, model: T2TViT) -> dict:
    """Drop a stored ``pos_embed`` (the official checkpoints keep the fixed table as a frozen
    parameter); the model regenerates it for its own grid."""
    return {k: v for k, v in state_dict.items() if k != "pos_embed"}


# Architecture kwargs per registered name; anything passed to create_model overrides them.
T2T_VIT_ARGS: dict[str, dict[str, Any]] = {
    "t2t_vit_7": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, token_dim=64),
    "t2t_vit_14": dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, token_dim=64),
    # CPU-sized: 3x3 splits with strides 2, 2, 1, so a 28 px image gives a 7x7 grid (28 -> 14 -> 7 -> 7;
    # total stride 4 as vit_pico's patches; strides 1, 2, 2 cost 3x the CPU time for the same grid).
    # No img_size here: timm takes it from the cfg (28) or from an export overlay.
    "t2t_vit_pico_28": dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, token_dim=32,
                            t2t_kernels=(3, 3, 3), t2t_strides=(2, 2, 1), t2t_paddings=(1, 1, 1)),
}
T2T_VIT_NAMES = tuple(T2T_VIT_ARGS)


def _cfg(img_size: int, num_classes: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> dict:
    # No url / hf_hub_id: nothing may download. fixed_input_size makes timm pass img_size from
    # input_size (an export's resolution); first_conv None: the stem is an unfold + Linear.
    return {"url": "", "num_classes": num_classes, "input_size": (3, img_size, img_size), "pool_size": None,
            "crop_pct": 0.9 if img_size == 224 else 1.0, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": mean, "std": std, "first_conv": None, "classifier": "head", "license": "other"}


default_cfgs = generate_default_cfgs({
    "t2t_vit_7": _cfg(224, 1000),
    "t2t_vit_14": _cfg(224, 1000),
    "t2t_vit_pico_28": _cfg(28, 0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    return build_model_with_cfg(T2TViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**T2T_VIT_ARGS[variant], **kwargs})


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7 (performer T2T layers): dim 256, depth 7, heads 4, mlp 2; 4.3M params, 1.1G MACs."""
    return _create("t2t_vit_7", pretrained, **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14 (performer T2T layers): dim 384, depth 14, heads 6, mlp 3; 21.5M params, 4.8G MACs."""
    return _create("t2t_vit_14", pretrained, **kwargs)


@register_model
def t2t_vit_pico_28(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-pico @ 28 px: dim 96, depth 4, heads 3; 3x3 soft splits, strides 2/2/1 -> 7x7 grid; CPU tests."""
    return _create("t2t_vit_pico_28", pretrained, **kwargs)
