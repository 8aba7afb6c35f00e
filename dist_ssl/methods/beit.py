"""BEiT masked image modeling with data-only tokenizers.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (2021): a ViT sees the image with
~40% of its patch embeddings replaced by a learned mask token (block-wise masking) and predicts
the visual token of every masked patch (cross-entropy). The tokenizer here is one of El-Nouby et
al.'s data-only ones ("Are Large-scale Datasets Necessary for Self-Supervised Pre-training?",
2021, Sec. 3.2: random projection, random patches, k-means; see dist_ssl.models.tokenizers) in
place of the DALL-E dVAE, and it tokenises the same view the ViT sees.

Masks are drawn inside the method, per sample from (mask_seed, step, instance id), so a resumed
run repeats them exactly (dist_ssl.data.masking). Shapes: x [B, C, H, W]; mask [B, N] (True =
masked, N = h * w patches); logits [M, V] for the M masked patches of the batch; V = vocab_size.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.masking import make_masks
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.heads.mim_decoder import check_vit, vit_embed, vit_encode, vit_grid, vit_patch_size
from dist_ssl.losses.mim import masked_token_loss
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.configs.beit import MIMConfig
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.cvt import CVT_NAMES
from dist_ssl.models.factory import create_backbone
from dist_ssl.models.names import resolve_backbone_name
from dist_ssl.models.t2t_vit import T2T_VIT_NAMES
from dist_ssl.models.tokenizers import PatchTokenizer, build_tokenizer


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


class BEiTStudent(nn.Module):
    """ViT + mask token + linear token classifier: ``forward(x, mask) -> logits [M, V]``."""

    def __init__(self, backbone: nn.Module, vocab: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, vocab)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        prefix, patches = vit_embed(self.backbone, x, mask, self.mask_token)
        _, out = vit_encode(self.backbone, prefix, patches)
        return self.lm_head(out[mask])


@register_method("beit")
class BEiT(Method):
    config_class = MIMConfig

    def __init__(self, cfg: MIMConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        vit = mim_backbone(ctx, "beit")
        self.grid = vit_grid(vit)
        self.views = mim_views(cfg, vit, ctx.in_chans)
        self.tokenizer = mim_tokenizer(cfg, vit, ctx.in_chans)
        self.student = BEiTStudent(vit, cfg.vocab_size)
        self.seed = int(ctx.seed)

    def train_views(self) -> ViewSpec:
        return self.views

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        x = batch["views"][0]
        mask = mim_masks(self.cfg, self.grid, batch, step, self.seed)
        targets = self.tokenizer(x)[mask]
        logits = self.student(x, mask)
        loss, acc = masked_token_loss(logits, targets)
        return {"loss": loss, "logs": {"mim_ce": loss.detach(), "mim_acc": acc}}

    def backbone(self) -> nn.Module:
        return unwrap_model(self.student).backbone
