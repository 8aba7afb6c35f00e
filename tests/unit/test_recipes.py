"""Every recipe loads and validates; the IDMM / fine-tune chains are consistent; the Fashion-MNIST
recipes build against a real shard manifest (N instance classes / K classes read at start-up)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dist_ssl.config import load_config
from dist_ssl.data.manifest import load_manifest
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.idmm import _check_crop_sizes, backbone_config
from dist_ssl.models.export import export_backbone

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPES).parts)


def _name(p: Path) -> str:
    return str(p.relative_to(RECIPES))


@pytest.mark.parametrize("path", ALL, ids=_name)
def test_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.output_dir
    if cfg.method.name == "idmm":  # crop sizes the backbone can take (dynamic_img_size when mixed)
        _check_crop_sizes(backbone_config(cfg.method, cfg.model), [g.size for g in cfg.method.crop_groups()])


def test_idmm_and_finetune_recipes_exist_for_the_paper():
    names = {p.stem for p in ALL}
    for ds in ("flowers", "pets", "dtd", "indoor67", "cub200", "aircraft", "cars"):
        assert {f"idmm_{ds}", f"finetune_{ds}", f"finetune_{ds}_448"} <= names, ds
    assert {"idmm_in1k", "idmm_sin10k", "finetune_in1k_from_sin10k", "finetune_in1k_scratch",
            "idmm_fmnist2k", "finetune_fmnist2k", "finetune_fmnist2k_scratch"} <= names
    paper = load_config(RECIPES / "idmm_flowers.yaml")
    assert (paper.model.name, paper.model.img_size, paper.train.epochs) == ("deit_tiny", 112, 800)
    assert (paper.optim.base_lr, paper.optim.weight_decay) == (5e-4, 1e-3)
    assert (paper.method.cutmix_alpha, paper.method.label_smoothing) == (0.5, 0.1)
    ft = load_config(RECIPES / "finetune_flowers.yaml")
    assert (ft.model.img_size, ft.train.epochs) == (224, 200)
    ft448 = load_config(RECIPES / "finetune_flowers_448.yaml")
    assert (ft448.model.img_size, ft448.train.epochs, ft448.optim.lr) == (448, 100, 5e-5)
    assert load_config(RECIPES / "finetune_in1k_scratch.yaml").method.init_from is None


def test_every_init_from_names_a_recipe_run_of_the_same_backbone():
    """A fine-tune's init_from is the output_dir of another recipe with the same architecture."""
    cfgs = {p: load_config(p) for p in ALL}
    producers = {c.output_dir: c for c in cfgs.values()}
    checked = 0
    for path, cfg in cfgs.items():
        src = getattr(cfg.method, "init_from", None)
        if not src or path.parent != RECIPES:  # sub-folders belong to other method families
            continue
        assert src in producers, f"{_name(path)}: init_from {src} is no recipe's output_dir"
        prod = producers[src]
        assert (prod.model.name, prod.model.in_chans) == (cfg.model.name, cfg.model.in_chans), _name(path)
        checked += 1
    assert checked >= 16  # 7 x (224 + 448) + fmnist + in1k


def _ctx(cfg, manifest) -> MethodContext:
    return MethodContext(model=copy.deepcopy(cfg.model), num_samples=manifest.num_samples,
                         num_classes=manifest.num_classes, in_chans=cfg.model.in_chans)


def test_fmnist_recipes_build_against_the_real_manifest(fmnist2k_shards, tmp_path):
    manifest = load_manifest(fmnist2k_shards)
    pre = load_config(RECIPES / "idmm_fmnist2k.yaml", [f"data.train={fmnist2k_shards}"])
    torch.manual_seed(0)
    idmm = build_method(pre.method, _ctx(pre, manifest))
    assert idmm.classifier.num_classes == manifest.num_samples == 2040  # one class per image
    assert idmm.train_views().in_chans == pre.model.in_chans == 1
    views = [torch.zeros(2, 1, g.size, g.size) for g in idmm.train_views().view_groups]
    assert idmm.student(views).shape == (2 * len(views), idmm.classifier.dim)
    export_backbone(idmm.backbone(), tmp_path / "backbone.safetensors")

    ft = load_config(RECIPES / "finetune_fmnist2k.yaml", [f"data.train={fmnist2k_shards}",
                                                          f"method.init_from={tmp_path}"])
    assert ft.model.name == pre.model.name
    sup = build_method(ft.method, _ctx(ft, manifest))
    assert sup.student(torch.zeros(2, 1, 28, 28)).shape == (2, manifest.num_classes)
    # the pre-training grid (+ cls token) is resampled to the 28 px fine-tuning grid (7x7 + cls)
    side = pre.model.img_size // 4
    assert sup.init_report.resampled["pos_embed"] == ((1, 1 + side * side, 96), (1, 50, 96))
    assert torch.equal(sup.student.blocks[0].attn.qkv.weight, idmm.backbone().blocks[0].attn.qkv.weight)
    scratch = load_config(RECIPES / "finetune_fmnist2k_scratch.yaml", [f"data.train={fmnist2k_shards}"])
    assert scratch.method.init_from is None
    assert {k: v for k, v in vars(scratch.optim).items()} == {k: v for k, v in vars(ft.optim).items()}
    assert (scratch.model, scratch.train) == (ft.model, ft.train)  # only the init differs

