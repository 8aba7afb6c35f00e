"""SimCLR / SupCon / MoCo v2 / MoCo v3 / DINO as methods: one step on a tiny ViT (single process).

What is particular to each: the MoCo v2 queue, the DINO center and schedules, MoCo v3's frozen
patch embedding, SimCLR without its projection head; configs validate, recipes load. The smoke
every method gets (gradients, teacher EMA, after_step state, state round trip) is
tests/unit/test_method_registry.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny_methods import TINY  # small heads: the point is the wiring, not the capacity

from dist_ssl.config import load_config
from dist_ssl.config.registry import variants
from dist_ssl.methods import MethodConfig, MethodContext, build_method
from dist_ssl.methods.momentum import teacher_forward
from dist_ssl.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
B = 6


def make(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = variants(MethodConfig)[name](**{**TINY[name], **overrides})
    cfg.validate()
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1, drop_path=0.1),
                        num_samples=100, num_classes=10, in_chans=1, total_steps=10, steps_per_epoch=5)
    return build_method(cfg, ctx)


def make_batch(method, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 1, grp.size, grp.size, generator=g) for grp in method.train_views().view_groups]
    return {"views": views, "label": torch.tensor([0, 1, 0, 2, 1, 0]), "index": torch.arange(B)}


def test_moco_v2_after_step_enqueues_the_normalised_teacher_keys():
    """(The generic one-step smoke, EMA and state checks: tests/unit/test_method_registry.py.)"""
    method = make("mocov2")
    batch = make_batch(method)
    method(batch, step=0)
    keys = F.normalize(teacher_forward(method.teacher, batch["views"][1:2]), dim=1)
    method.after_step(1)
    assert int(method.queue_ptr) == B
    torch.testing.assert_close(method.queue[:B], keys)


def test_dino_center_is_the_mean_teacher_output():
    method = make("dino")
    batch = make_batch(method)
    method(batch, step=0)
    expected = 0.1 * teacher_forward(method.teacher, batch["views"][:2]).mean(0, keepdim=True)
    method.after_step(1)
    torch.testing.assert_close(method.loss.center, expected)


def test_moco_v2_queue_wraps_around_and_keeps_newest():
    method = make("mocov2")
    method.queue_ptr.fill_(12)
    keys = torch.arange(20 * 16, dtype=torch.float32).reshape(20, 16)
    method.enqueue(keys[:6])           # rows 12..15 then 0..1
    assert int(method.queue_ptr) == 2 and torch.equal(method.queue[12:], keys[:4])
    assert torch.equal(method.queue[:2], keys[4:6])
    method.enqueue(keys)               # more keys than the queue: the newest 16 land
    assert sorted(method.queue[:, 0].tolist()) == sorted(keys[4:, 0].tolist())


def test_schedules_and_mocov3_frozen_patch_embed():
    dino = make("dino")
    assert dino.teacher_temp_at(0) == pytest.approx(0.04) and dino.teacher_temp_at(10) == pytest.approx(0.07)
    assert dino.teacher_temp_at(5) == pytest.approx(0.055)
    assert dino.momentum_at(1) == pytest.approx(0.996) and 0.9999 < dino.momentum_at(10) < dino.momentum_at(11) == 1.0
    assert dino.student.backbone.dynamic_img_size  # local crops of 12 px on a 28 px ViT
    assert all(m.drop_prob == 0 for m in dino.teacher.modules() if hasattr(m, "drop_prob"))
    v3 = make("mocov3")
    assert not any(p.requires_grad for p in v3.student.backbone.patch_embed.parameters())
    assert v3.momentum_at(1) == pytest.approx(0.99) and v3.momentum_at(6) > 0.99
    assert set(n.split(".")[0] for n, _ in v3.teacher.named_parameters()) == {"backbone", "head"}
    assert make("mocov3", freeze_patch_embed=False).student.backbone.patch_embed.proj.weight.requires_grad
    assert [g.count for g in make("mocov2").train_views().groups] == [2]


@pytest.mark.parametrize("name, key, value", [
    ("simclr", "temperature", 0.0), ("supcon", "base_temperature", -1.0), ("mocov2", "queue_size", 0),
    ("mocov3", "momentum", 1.5), ("dino", "local_crops", -1), ("dino", "teacher_temp", 0.0),
])
def test_config_errors_name_the_key(name, key, value):
    cfg = variants(MethodConfig)[name](**{key: value})
    with pytest.raises(ValueError, match=f"^{key}: "):
        cfg.validate()


METHODS = ("simclr", "supcon", "mocov2", "mocov3", "dino")
RECIPES = sorted([REPO / "recipes" / f"{m}_fmnist2k.yaml" for m in METHODS]
                 + list((REPO / "recipes" / "baselines").glob("*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_validate(recipe):
    cfg = load_config(recipe)
    method = recipe.stem.split("_")[0]
    if "baselines" not in recipe.parts:
        assert cfg.method.name == method and cfg.model.name == "vit_pico_patch4_28"
        return
    assert cfg.model.name == "deit_tiny" and cfg.train.epochs == (200 if method == "finetune" else 800)
    assert cfg.model.img_size == (224 if method == "finetune" else 112)
    if method in METHODS:
        assert cfg.method.name == method


def test_every_method_has_paper_recipes():
    stems = {p.stem for p in RECIPES}
    assert {f"{m}_deit_tiny_112" for m in METHODS} | {"mocov3_sin10k", "dino_sin10k"} <= stems
    dino = load_config(REPO / "recipes" / "baselines" / "dino_deit_tiny_112.yaml")
    assert dino.method.out_dim == 256 and dino.optim.clip_grad == 3.0 and dino.model.drop_path == 0.1
    v2 = load_config(REPO / "recipes" / "baselines" / "mocov2_deit_tiny_112.yaml")
    assert v2.method.queue_size == 2048 and v2.method.temperature == 0.2


# ----------------------------------------------------------------------------- Table 9: no head
def _plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent written out in float64: 2B anchors, positive = the other view, self excluded."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


@pytest.mark.parametrize("name", ["simclr", "supcon"])
def test_without_projection_the_loss_acts_on_backbone_features(name):
    """IDMM Table 9's 'SimCLR without proj. MLP': an identity head, the loss on the pooled features."""
    method = make(name, projection=False)
    assert isinstance(method.student.head, torch.nn.Identity)
    assert not any(n.startswith("head.") for n, _ in method.student.named_parameters())
    batch = make_batch(method)
    out = method(batch, step=0)
    method.eval()  # the same backbone features without drop path, for the reference below
    z1, z2 = (method.backbone()(v) for v in batch["views"][:2])
    assert z1.shape == (B, 96)  # D of the backbone, no projection
    if name == "simclr":
        torch.testing.assert_close(method(batch, step=0)["loss"].double(), _plain_nt_xent(z1, z2, 0.1),
                                   rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
