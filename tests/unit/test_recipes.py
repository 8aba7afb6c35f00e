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
# accelerate/: launcher configs; experiments/: experiment files (tests/unit/test_experiment_spec.py)
ALL = sorted(p for p in RECIPES.rglob("*.yaml")
             if not {"accelerate", "experiments"} & set(p.relative_to(RECIPES).parts))


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
    # Sec. 4.2: AdamW, batch 256 (32 x 8 processes), weight decay 1e-3, lr 5e-4 cosine; new head
    assert (ft.optim.name, ft.train.batch_size, ft.optim.weight_decay, ft.optim.base_lr) == ("adamw", 32, 1e-3, 5e-4)
    assert ft.method.init_head is False
    ft448 = load_config(RECIPES / "finetune_flowers_448.yaml")
    assert (ft448.model.img_size, ft448.train.epochs, ft448.optim.lr) == (448, 100, 5e-5)
    # official 448 stage: -b 128 (16 x 8 processes) --wd 1e-3, 2 warmup epochs, the 224 model's head kept
    assert (ft448.train.batch_size, ft448.optim.weight_decay, ft448.optim.warmup_epochs) == (16, 1e-3, 2)
    assert ft448.method.init_head is True and ft448.method.init_from == "runs/finetune_flowers"
    assert load_config(RECIPES / "finetune_in1k_scratch.yaml").method.init_from is None


def test_table3_long_schedule_pvt_and_transfer_recipes():
    for ds in ("flowers", "pets", "dtd", "indoor67", "cub200", "aircraft", "cars"):  # 800 -> 100 epochs
        long, cont = (load_config(RECIPES / "table3" / f"finetune_{ds}_800ep{s}.yaml") for s in ("", "_448"))
        assert (long.train.epochs, long.model.img_size, long.method.init_from) == (800, 224, f"runs/idmm_{ds}")
        assert (cont.train.epochs, cont.model.img_size, cont.method.init_from) == (100, 448, long.output_dir)
        assert cont.method.init_head and cont.data.train == long.data.train == f"data/{ds}/train"
    for b in ("b0", "b3"):  # Tables 3-7 for PVTv2: official lr 1e-3 at batch 256
        pre, ft = (load_config(RECIPES / "pvt" / f"{k}_pvt_v2_{b}.yaml") for k in ("idmm", "finetune"))
        assert pre.model.name == ft.model.name == f"pvt_v2_{b}" and pre.method.name == "idmm"
        assert pre.optim.base_lr == ft.optim.base_lr == 1e-3 and (pre.train.epochs, ft.train.epochs) == (800, 800)
        assert load_config(RECIPES / "pvt" / f"finetune_pvt_v2_{b}_448.yaml").method.init_from == ft.output_dir
        sin = load_config(RECIPES / "pvt" / f"finetune_pvt_v2_{b}_from_sin10k.yaml")
        assert sin.train.epochs == 200 and sin.method.init_from == f"runs/idmm_sin10k_pvt_v2_{b}"
    table7 = {  # recipe: (backbone, epochs, init)
        "finetune_in1k_scratch_300ep": ("deit_tiny", 300, None),
        "finetune_in1k_from_sin10k_300ep": ("deit_tiny", 300, "runs/idmm_sin10k"),
        "pvt/finetune_in1k_pvt_v2_b0_scratch": ("pvt_v2_b0", 100, None),
        "pvt/finetune_in1k_pvt_v2_b0_scratch_300ep": ("pvt_v2_b0", 300, None),
        "pvt/finetune_in1k_pvt_v2_b0_from_sin10k_300ep": ("pvt_v2_b0", 300, "runs/idmm_sin10k_pvt_v2_b0"),
        "pvt/finetune_in1k_pvt_v2_b0_from_sin_total10k": ("pvt_v2_b0", 100, "runs/idmm_sin_total10k_pvt_v2_b0"),
        "finetune_in1k_from_sin_total10k": ("deit_tiny", 100, "runs/idmm_sin_total10k"),
    }
    for name, want in table7.items():
        cfg = load_config(RECIPES / f"{name}.yaml")
        assert (cfg.model.name, cfg.train.epochs, cfg.method.init_from) == want, name
        assert cfg.data.train == "data/imagenet/train" and cfg.model.img_size == 224, name
    assert load_config(RECIPES / "pvt" / "idmm_sin_total10k_pvt_v2_b0.yaml").data.train == "data/sin_total10k/train"
    sup = load_config(RECIPES / "pvt" / "supervised_sin10k_pvt_v2_b0.yaml")  # Table 6 "supervised" row
    assert (sup.method.name, sup.data.train, sup.method.init_from, sup.train.epochs) == \
        ("supervised", "data/sin10k/train", None, 800)


# IDMM paper appendix B, Table 10: optimizer, global batch (x 8 processes), lr, wd, dim, tau
TABLE10 = {
    "mocov2": ("sgd", 256, 5e-4, 1e-3, 256, 0.2),
    "mocov3": ("adamw", 256, 1.5e-4, 0.1, 256, 0.2),
    "simclr": ("sgd", 512, 5e-4, 1e-3, 256, 0.1),
    "supcon": ("sgd", 512, 5e-4, 1e-3, 256, 0.1),
    "dino": ("adamw", 512, 5e-4, 0.04, 256, 0.1),
}


@pytest.mark.parametrize("method", sorted(TABLE10))
def test_baseline_recipes_follow_table_10(method):
    cfg = load_config(RECIPES / "baselines" / f"{method}_deit_tiny_112.yaml")
    m, o = cfg.method, cfg.optim
    lr = o.lr if o.lr is not None else o.base_lr  # absolute where Table 10 is, per 256 where the code is
    dim = m.out_dim if method == "dino" else m.proj_dim
    tau = m.student_temp if method == "dino" else m.temperature
    assert (o.name, cfg.train.batch_size * 8, lr, o.weight_decay, dim, tau) == TABLE10[method]
    assert (o.schedule, cfg.train.epochs, cfg.model.img_size) == ("cosine", 800, 112)
    if method == "mocov2":
        assert m.queue_size == 2048
    if o.name == "sgd":
        assert (o.momentum, o.nesterov, o.lr) == (0.9, False, 5e-4)


def test_every_init_from_names_a_recipe_run_of_the_same_backbone():
    """A fine-tune's init_from is the output_dir of another recipe with the same architecture; a
    continuation with the head (init_head) continues a supervised run on the same data."""
    cfgs = {p: load_config(p) for p in ALL}
    producers = {c.output_dir: c for c in cfgs.values()}
    assert len(producers) == len(cfgs), "two recipes write the same output_dir"
    checked = 0
    for path, cfg in cfgs.items():
        src = getattr(cfg.method, "init_from", None)
        if not src:
            continue
        assert src in producers, f"{_name(path)}: init_from {src} is no recipe's output_dir"
        prod = producers[src]
        assert (prod.model.name, prod.model.in_chans) == (cfg.model.name, cfg.model.in_chans), _name(path)
        if cfg.method.init_head:
            assert (prod.method.name, prod.data.train) == ("supervised", cfg.data.train), _name(path)
        checked += 1
    assert checked >= 44  # 7 x (224, 448, 800, 800 -> 448) + 9 PVTv2 + 4 in1k + fmnist + baseline + 2 mim


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

