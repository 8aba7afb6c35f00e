"""The CPU-sized T2T-ViT recipes through the real `tools/train.py` on real Fashion-MNIST shards:
IDMM pre-training of T2T-ViT-pico at 16 px, then fine-tuning from its export at 28 px (the
resolution change of the paper's pipeline). CvT-pico + DRLoc is covered by one step on real shards
in tests/unit/test_t2t_cvt_methods.py and by the 2-process tests in tests/dist/ (each CLI start
costs ~10 s of CPU in imports alone)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers t2t_vit_* / cvt_* with timm)
from dist_ssl.models.export import load_backbone_file, read_export_metadata, timm_pretrained_kwargs

from .conftest import REPO, read_log, train_env

FAST = ["data.num_workers=0", "metrics.log_every_steps=1", "train.batch_size=32", "ckpt.every_steps=100"]


def train(recipe: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "recipes" / recipe),
           f"output_dir={out}", *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def idmm_run(tmp_path_factory, fmnist2k_shards) -> Path:
    out = tmp_path_factory.mktemp("idmm_t2t") / "run"
    train("idmm_fmnist2k_t2t_vit.yaml", out, f"data.train={fmnist2k_shards}", "train.steps=3",
          "optim.warmup_epochs=null", "optim.warmup_steps=1")
    return out


def test_idmm_t2t_recipe_trains_and_exports(idmm_run):
    info = json.loads((idmm_run / "run.json").read_text())
    assert (info["method"], info["num_samples"]) == ("idmm", 2040)
    rows = read_log(idmm_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2040), abs=0.5)  # two crop groups near log N
    path = idmm_run / "backbone.safetensors"
    meta = read_export_metadata(path)
    assert (meta["architecture"], meta["img_size"], meta["in_chans"]) == ("t2t_vit_pico_28", "16x16", "1")
    model = timm.create_model("t2t_vit_pico_28", **timm_pretrained_kwargs(path))
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 96)


def test_finetune_from_the_t2t_export_at_28px(idmm_run, tmp_path, fmnist2k_shards, fmnist_test_shards_small):
    out = tmp_path / "ft"
    # one step whose warmup lr is exactly 0: the exported backbone must be the IDMM one, unchanged
    proc = train("finetune_fmnist2k_t2t_vit.yaml", out, f"data.train={fmnist2k_shards}",
                 f"data.val={fmnist_test_shards_small}", f"method.init_from={idmm_run}", "train.steps=1",
                 "optim.warmup_epochs=null", "optim.warmup_steps=4", "optim.start_warmup_lr=0.0",
                 "optim.min_lr=0.0")
    assert "loaded backbone:" in proc.stderr and "resampled []" in proc.stderr  # the table is regenerated
    rows = read_log(out)
    assert len(rows) == 1 and rows[0]["lr"] == 0.0 and math.isfinite(rows[0]["loss"])
    assert json.loads((out / "eval.json").read_text())["num_samples"] == 500
    pre, ft = load_backbone_file(idmm_run / "backbone.safetensors"), load_backbone_file(out / "backbone.safetensors")
    assert ft.keys() == pre.keys() and all(torch.equal(ft[k], pre[k]) for k in pre)
    assert read_export_metadata(out / "backbone.safetensors")["img_size"] == "28x28"

