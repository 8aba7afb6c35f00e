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

from dist_ssl.data.views import ViewSpec
from dist_ssl.losses.mim import masked_token_loss
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.configs.beit import MIMConfig
from dist_ssl.methods.mim_common import mim_backbone, mim_masks, mim_tokenizer, mim_views
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import unwrap_model
from dist_ssl.models.vit_tokens import vit_embed, vit_encode, vit_grid


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
