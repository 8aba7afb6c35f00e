"""T2T-ViT and CvT wherever a backbone is used: one IDMM step and one DRLoc step on real
Fashion-MNIST shards, the MIM methods' refusal, and k-NN / linear probe of an exported backbone."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch

import dist_ssl.methods  # noqa: F401  (registers every method's config; build_method imports the method)
from dist_ssl.config.errors import ConfigError
from dist_ssl.config.schema import from_dict
from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.eval.cli_eval import main as eval_main
from dist_ssl.heads.drloc import DRLocStudent
from dist_ssl.methods import MethodConfig, MethodContext, build_method
from dist_ssl.models import ModelConfig, create_backbone, export_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
BACKBONES = ("t2t_vit_pico", "cvt_pico")


def method(name: str, backbone: str, manifest, img_size: int, **overrides):
    torch.manual_seed(0)
    cfg = from_dict(MethodConfig, {"name": name, **overrides})
    model = ModelConfig(name=backbone, img_size=img_size, in_chans=1, dynamic_img_size=name == "idmm")
    ctx = MethodContext(model=model, num_samples=manifest.num_samples, num_classes=manifest.num_classes, in_chans=1)
    return build_method(cfg, ctx)


def real_batch(m, shards, batch_size: int = 8) -> dict:
    loader = build_train_loader(shards, m.train_views(), batch_size, num_workers=0, seed=0)
    loader.set_epoch(0)
    return next(iter(loader))


# CvT's last block feeds only its class token to the head: the spatial queries of that block (the
# conv q projection; the class token's query skips it) reach no output -- so in the official code too.
DEAD_UNDER_CLS_POOLING = [f"student.backbone.stage2.blocks.1.attn.conv_proj_q.{n}"
                          for n in ("conv.weight", "bn.weight", "bn.bias")]


def steps(m, batch: dict, n: int, dead_q: bool = False) -> list[float]:
    """n AdamW steps on one batch (the IDMM classifier has its own optimizer, as in the engine)."""
    opts = [torch.optim.AdamW(m.student.parameters(), lr=1e-3)]
    if hasattr(m, "classifier"):
        opts.append(torch.optim.AdamW(m.classifier.parameters(), lr=1e-2))
    losses = []
    for step in range(n):
        out = m(batch, step=0)  # the same CutMix draw / DRLoc pairs every time: the loss must fall
        for o in opts:
            o.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert all(p.grad is not None for p in m.parameters())  # DDP needs every gradient
            silent = [k for k, p in m.named_parameters() if not p.grad.abs().sum() > 0]
            assert silent == (DEAD_UNDER_CLS_POOLING if dead_q else []), silent
        for o in opts:
            o.step()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("backbone", BACKBONES)
def test_idmm_step_on_real_shards(backbone, fmnist2k_shards):
    manifest = load_manifest(fmnist2k_shards)
    m = method("idmm", backbone, manifest, 16, global_size=16, local_size=8, local_crops=2, blur_p=0.0)
    batch = real_batch(m, fmnist2k_shards)
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(16, 16)] * 2 + [(8, 8)] * 2
    out = m(batch, step=0)  # class-token features of both crop sizes into the 2,040-way classifier
    assert out["logs"]["ce_global"].item() == pytest.approx(math.log(2040), abs=0.5)
    losses = steps(m, batch, 3, dead_q=backbone == "cvt_pico")
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    backbone_keys = timm.create_model(f"{backbone}_28", in_chans=1).state_dict().keys()
    assert m.backbone().state_dict().keys() == backbone_keys  # exports as timm names it


@pytest.mark.parametrize("backbone", BACKBONES)
def test_drloc_step_on_real_shards(backbone, fmnist2k_shards):
    manifest = load_manifest(fmnist2k_shards)
    m = method("supervised", backbone, manifest, 28, drloc=True, drloc_pairs=16)
    assert isinstance(m.student, DRLocStudent)
    batch = real_batch(m, fmnist2k_shards)
    out = m(batch, step=5)
    logs = out["logs"]
    assert torch.allclose(out["loss"], logs["ce"] + 0.1 * logs["drloc"])  # lambda 0.1 (T2T, CvT)
    assert 0 < logs["drloc"].item() < 1  # L1 on offsets normalised by the 7x7 grid
    losses = steps(m, batch, 3)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    m.eval()
    with torch.no_grad():
        x = batch["views"][0]
        logits, pred, target = m.student(x, torch.rand(x.shape[0], 4, 4))
        assert torch.allclose(logits, m.backbone()(x), atol=1e-6)  # one pass gives both outputs
        assert pred.shape == target.shape == (x.shape[0], 4, 2)


@pytest.mark.parametrize("name", ["beit", "splitmask", "mae"])
@pytest.mark.parametrize("backbone", ["t2t_vit_pico", "cvt_13"])
def test_mim_methods_refuse_t2t_and_cvt_in_one_line(name, backbone):
    cfg = from_dict(MethodConfig, {"name": name})
    ctx = MethodContext(model=ModelConfig(name=backbone, in_chans=1), num_samples=100, num_classes=10, in_chans=1)
    with pytest.raises(ConfigError) as err:
        build_method(cfg, ctx)
    msg = str(err.value)
    arch = "t2t_vit_pico_28" if backbone == "t2t_vit_pico" else backbone
    assert msg.startswith(f"model.name: {name} masks the patch tokens of a plain ViT, but {arch} is a ")
    assert "vit_small" in msg and "idmm" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def probe_train(fmnist_dir, tmp_path_factory):
    """500 Fashion-MNIST training images (50 per class): a probe's train split, cheap to embed."""
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("probe_train") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, split="train", subset="per-class:50", samples_per_shard=256, seed=0)
    return out


@pytest.mark.parametrize("backbone,export_size", [("t2t_vit_pico", 16), ("cvt_pico", 28)])
def test_knn_and_linear_probe_of_an_exported_backbone(backbone, export_size, probe_train,
                                                      fmnist_test_shards_small, tmp_path):
    """A random-init backbone exported as IDMM pre-training would (T2T-ViT at its 16 px crop
    size) and probed at 28 px: the T2T table is regenerated for the 7x7 grid."""
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name=backbone, img_size=export_size, in_chans=1))
    export_backbone(model, tmp_path / "backbone.safetensors")
    out = tmp_path / "probe.json"
    argv = ["--backbone", str(tmp_path), "--train", str(probe_train), "--test", str(fmnist_test_shards_small),
            "--img-size", "28", "--linear-epochs", "30", "--workers", "0", "--out", str(out), "-q"]
    assert eval_main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["num_train"], res["num_test"], res["img_size"]) == (500, 500, 28)
    print(backbone, {k: v for k, v in res.items() if "_top1" in k})
    assert res["knn_top1"] > 0.3 and res["linear_top1"] > 0.3, res  # 10 classes: chance is 0.1
