"""Optimizer param groups on a real timm ViT: weight-decay rules, layer decay, lr scaling."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dist_ssl.models.factory  # noqa: F401  (registers vit_pico_patch4_28 with timm)
from dist_ssl.engine.optim import (
    absolute_lr, build_optimizer, param_groups, resolve_warmup_steps, set_weight_decay, vit_layer_id,
)
from dist_ssl.engine.optim_config import OptimConfig

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


# ----------------------------------------------------------------------------- SGD
def _reference_sgd_groups(model: nn.Module, lr: float, wd: float, layer_decay: float) -> list[dict]:
    """The groups written out by hand from the rules in the module docstring (no param_groups):
    no decay on 1-d params, biases, cls_token and pos_embed; layer id 0 for the stem, i+1 for
    blocks.i, depth+1 for the rest; lr = lr * layer_decay ** (depth + 1 - layer)."""
    depth = 1 + max(int(n.split(".")[1]) for n, _ in model.named_parameters() if n.startswith("blocks."))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        decay = p.ndim > 1 and name not in ("cls_token", "pos_embed")
        g = groups.setdefault((layer, decay), {"params": [], "weight_decay": wd if decay else 0.0,
                                               "lr": lr * layer_decay ** (depth + 1 - layer), "decay": decay})
        g["params"].append(p)
    return list(groups.values())


def _set_grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_sgd_equals_plain_torch_sgd_on_the_same_groups_through_schedule_wd_and_resume():
    from dist_ssl.engine.schedules import build_lr_scheduler

    torch.manual_seed(0)
    ours_model = timm.create_model("vit_pico_patch4_28", pretrained=False, img_size=16, in_chans=1, num_classes=3)
    ref_model, init = copy.deepcopy(ours_model), copy.deepcopy(ours_model)
    lr, wd, ld, total, warm = 0.1, 1e-3, 0.8, 6, 2
    cfg = OptimConfig(name="sgd", weight_decay=wd, layer_decay=ld)
    assert (cfg.momentum, cfg.nesterov) == (0.9, False)
    opt = build_optimizer(cfg, param_groups(ours_model, wd, layer_decay=ld), lr)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] is False for g in opt.param_groups)
    sched = build_lr_scheduler(opt, total_steps=total, warmup_steps=warm, lr=lr, min_lr=1e-4)
    ref_groups = _reference_sgd_groups(ref_model, lr, wd, ld)
    ref = torch.optim.SGD([{k: v for k, v in g.items() if k != "decay"} for g in ref_groups], lr=lr,
                          momentum=0.9)
    base_lrs = [g["lr"] for g in ref.param_groups]
    mult = sched.lr_lambdas[0]  # the schedule is checked in test_schedules; here only its use
    saved = None
    for step in range(total):
        if step == 3:  # a weight-decay schedule step (set_weight_decay) on the decayed groups only
            set_weight_decay(opt, 0.05)
            for g, rg in zip(ref_groups, ref.param_groups):
                rg["weight_decay"] = 0.05 if g["decay"] else 0.0
        for rg, base in zip(ref.param_groups, base_lrs):
            rg["lr"] = base * mult(step)
        _set_grads(ours_model, step)
        _set_grads(ref_model, step)
        opt.step()
        sched.step()
        ref.step()
        if step == 1:  # checkpoint round trip into a fresh optimizer + scheduler
            saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
            opt = build_optimizer(cfg, param_groups(ours_model, wd, layer_decay=ld), lr)
            sched = build_lr_scheduler(opt, total_steps=total, warmup_steps=warm, lr=lr, min_lr=1e-4)
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
    assert saved is not None and any("momentum_buffer" in s for s in saved[0]["state"].values())
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(ours_model.parameters(), init.parameters()))  # all trained


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "lamb"}, "name"), ({"momentum": 1.0}, "momentum"), ({"nesterov": True, "momentum": 0.0}, "nesterov"),
])
def test_sgd_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        OptimConfig(**kwargs).validate()


def test_optim_name_from_a_recipe_override():
    from dist_ssl.config import load_config

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "simclr_fmnist2k.yaml"
    cfg = load_config(recipe, ["optim.name=sgd", "optim.nesterov=true"])
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.9, True)
