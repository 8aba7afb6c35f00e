"""Optimizer param groups on a real timm ViT: weight-decay rules, layer decay, lr scaling."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from dist_ssl.engine.optim import (
    OptimConfig, absolute_lr, build_optimizer, param_groups, resolve_warmup_steps, set_weight_decay, vit_layer_id,
)

WD = 0.05


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4)


def _name_to_group(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_no_decay_on_tokens_norms_biases_decay_on_weights(vit):
    groups = param_groups(vit, WD)
    where = _name_to_group(vit, groups)
    assert len(where) == len(list(vit.parameters())), "every trainable param in exactly one group"
    assert sum(len(g["params"]) for g in groups) == len(where)

    for name in ("cls_token", "pos_embed"):
        assert where[name]["weight_decay"] == 0.0, name
    norm_params = [f"{m}.{p}" for m, mod in vit.named_modules() if isinstance(mod, nn.LayerNorm)
                   for p, _ in mod.named_parameters()]
    assert len(norm_params) == 2 * (2 * 12 + 1)  # norm1/norm2 per block + final norm, weight+bias
    biases = [n for n, _ in vit.named_parameters() if n.endswith(".bias")]
    for name in norm_params + biases:
        assert where[name]["weight_decay"] == 0.0, name

    weights = [f"{m}.weight" for m, mod in vit.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert "patch_embed.proj.weight" in weights and "head.weight" in weights
    for name in weights:
        assert where[name]["weight_decay"] == WD, name
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert len(groups) == 2


def test_frozen_params_excluded_and_wrapped_backbone_tokens(vit):
    class Method(nn.Module):  # a backbone nested inside a method, plus a method-level token
        def __init__(self) -> None:
            super().__init__()
            self.backbone = vit
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 192))
            self.proj = nn.Linear(192, 8)

    m = Method()
    vit.patch_embed.proj.weight.requires_grad_(False)
    try:
        where = _name_to_group(m, param_groups(m, WD, extra_no_decay=("proj.*",)))
    finally:
        vit.patch_embed.proj.weight.requires_grad_(True)
    assert "backbone.patch_embed.proj.weight" not in where
    assert where["backbone.cls_token"]["weight_decay"] == 0.0
    assert where["backbone.pos_embed"]["weight_decay"] == 0.0
    assert where["mask_token"]["weight_decay"] == 0.0
    assert where["proj.weight"]["weight_decay"] == 0.0  # extra glob
    assert where["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == WD


def test_layer_decay_scales(vit):
    ld = 0.5
    where = _name_to_group(vit, param_groups(vit, WD, layer_decay=ld))
    depth = 12
    # stem = layer 0, blocks.i = i + 1, final norm and head = depth + 1 (scale 1).
    expected = {
        "cls_token": ld ** (depth + 1), "pos_embed": ld ** (depth + 1),
        "patch_embed.proj.weight": ld ** (depth + 1),
        "blocks.0.attn.qkv.weight": ld ** depth, "blocks.0.norm1.bias": ld ** depth,
        "blocks.11.mlp.fc2.weight": ld ** 1, "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0,
    }
    for name, scale in expected.items():
        assert where[name]["lr_scale"] == pytest.approx(scale), name
    assert where["head.weight"]["weight_decay"] == WD and where["head.bias"]["weight_decay"] == 0.0
    assert vit_layer_id("backbone.blocks.3.attn.qkv.weight", depth) == 4


def test_build_optimizer_applies_lr_scale(vit):
    cfg = OptimConfig(layer_decay=0.65)
    groups = param_groups(vit, cfg.weight_decay, layer_decay=cfg.layer_decay)
    opt = build_optimizer(cfg, groups, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["betas"] == (0.9, 0.999)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, cfg.weight_decay}


def test_absolute_lr_and_warmup():
    cfg = OptimConfig(base_lr=5e-4)
    assert absolute_lr(cfg, 1024) == pytest.approx(2e-3)
    assert absolute_lr(cfg, 256) == pytest.approx(5e-4)
    assert absolute_lr(OptimConfig(lr=0.1), 1024) == 0.1
    assert resolve_warmup_steps(OptimConfig(warmup_epochs=2.5), steps_per_epoch=10) == 25
    assert resolve_warmup_steps(OptimConfig(warmup_steps=7), steps_per_epoch=10) == 7
    assert resolve_warmup_steps(OptimConfig(), steps_per_epoch=10) == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"warmup_epochs": 1.0, "warmup_steps": 5}, "warmup_steps"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"schedule": "step"}, "schedule"),
])
def test_config_validate_names_field(kwargs, field):
    OptimConfig().validate()
    with pytest.raises(ValueError, match=f"^{field}:"):
        OptimConfig(**kwargs).validate()


def test_set_weight_decay_changes_decayed_groups_only(vit):
    opt = build_optimizer(OptimConfig(weight_decay=0.05), param_groups(vit, 0.05), lr=1e-3)
    set_weight_decay(opt, 0.3)
    by_kind = {g["group_name"]: g["weight_decay"] for g in opt.param_groups}
    assert by_kind == {"layer_0_decay": 0.3, "layer_0_no_decay": 0.0}
