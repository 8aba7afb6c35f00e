"""The real CLIs on real Fashion-MNIST shards: tools/fit_tokenizer.py, then tools/train.py for
BEiT, SplitMask, MAE and supervised + DRLoc (single process, 10 steps each, tiny ViT)."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.models.export import timm_pretrained_kwargs
from dist_ssl.models.tokenizers import load_codebook

from .conftest import REPO, read_log, train_env, train_in_parallel

STEPS = 10
# drop_path 0 as in the supervised FAST overrides: the engine's resume is only bit-exact for
# models that draw nothing from the global RNG (DataLoader.__iter__ draws a seed from it)
FAST_MIM = ["model.name=vit_pico_patch4_28", "model.drop_path=0.0", "train.batch_size=32",
            "data.num_workers=0", "metrics.log_every_steps=1", "optim.warmup_epochs=null", "optim.warmup_steps=2",
            f"train.steps={STEPS}", "ckpt.every_steps=5"]
VOCAB = 64  # the recipes' 256 works too; smaller keeps the k-means fit at a few seconds
# name -> (recipe, extra overrides, logs the method must write)
RUNS = {
    "beit": ("beit_fmnist2k", [f"method.vocab_size={VOCAB}"], ("mim_ce", "mim_acc")),
    "splitmask": ("splitmask_fmnist2k", [f"method.vocab_size={VOCAB}"], ("mim_ce", "info_nce", "mim_acc")),
    "mae": ("mae_fmnist2k", [], ("mse",)),
    "drloc": ("supervised_drloc_fmnist2k", [], ("ce", "drloc", "train_acc")),
}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_args(name: str, out, shards, codebook, *extra: str) -> list[str]:
    recipe, overrides, _ = RUNS[name]
    tok = [f"method.tokenizer_path={codebook}"] if name in ("beit", "splitmask") else []
    return [str(REPO / "tools" / "train.py"), str(REPO / "recipes" / f"{recipe}.yaml"),
            f"output_dir={out}", f"data.train={shards}", *FAST_MIM, *overrides, *tok, *extra]


@pytest.fixture(scope="module")
def codebook(tmp_path_factory, fmnist2k_shards):
    out = tmp_path_factory.mktemp("tokenizer") / "kmeans.safetensors"
    proc = run_cli(str(REPO / "tools" / "fit_tokenizer.py"), "--shards", str(fmnist2k_shards),
                   "--out", str(out), "--kind", "kmeans", "--vocab", str(VOCAB), "--patch-size", "4",
                   "--img-size", "28", "--in-chans", "1", "--crop-scale", "0.35", "1.0",
                   "--images", "256", "--iters", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist2k_shards, fmnist_test_shards_small, codebook) -> dict:
    """All four runs, two at a time (each is single-threaded), SplitMask first, then its resume
    from step 5 ("splitmask_resumed", beside the last run); name -> run directory."""
    root = tmp_path_factory.mktemp("mim_cli")
    jobs = {}
    for name in ["splitmask"] + [name for name in RUNS if name != "splitmask"]:
        val = f"data.val={fmnist_test_shards_small}" if name == "drloc" else "data.val=null"
        out = root / name / "run"
        jobs[name] = ([sys.executable, *train_args(name, out, fmnist2k_shards, codebook, val)], out)
    out, ckpt = root / "splitmask_resumed" / "run", jobs["splitmask"][1] / "checkpoints" / "step_00000005"
    jobs["splitmask_resumed"] = ([sys.executable, *train_args("splitmask", out, fmnist2k_shards, codebook,
                                                              "data.val=null", f"resume={ckpt}")], out)
    train_in_parallel(jobs, after={"splitmask_resumed": ("splitmask", None)})
    return {name: out for name, (_, out) in jobs.items()}


def test_fit_tokenizer_cli(codebook, tmp_path, capsys):
    book, meta = load_codebook(codebook)
    assert book.shape == (VOCAB, 16) and torch.isfinite(book).all()
    assert meta["kind"] == "kmeans" and meta["patch_size"] == "4" and int(meta["iters"]) <= 20
    assert float(meta["objective"]) > 0.8  # mean best cosine similarity of the fitted patches
    assert not list(codebook.parent.glob("*.tmp"))  # written atomically
    spec = importlib.util.spec_from_file_location("fit_tokenizer", REPO / "tools" / "fit_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # bad input, in-process: one line on stderr, exit code 2
    assert tool.main(["--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors"),
                      "--kind", "kmeans", "--vocab", "8"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fit_tokenizer.py: error:")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name", list(RUNS))
def test_train_cli_smoke(runs, name):
    out = runs[name]
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", *RUNS[name][2]):
        assert all(math.isfinite(r[key]) for r in rows), key
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == ("supervised" if name == "drloc" else name) and info["total_steps"] == STEPS
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_00000005", "step_00000010"]
    # the exported backbone is the bare ViT (no decoder / heads), loadable by timm as is
    model = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(out / "backbone.safetensors"))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 96)
    if name == "drloc":
        result = json.loads((out / "eval.json").read_text())
        assert result["num_samples"] == 500 and 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_splitmask_resume_is_exact(runs):
    """Masks come from (step, id) and the codebook rides in the checkpoint: steps 6-10 after a
    resume from step 5 repeat the uninterrupted run bit for bit."""
    resumed = {r["step"]: (r["loss"], r["info_nce"]) for r in read_log(runs["splitmask_resumed"])}
    reference = {r["step"]: (r["loss"], r["info_nce"]) for r in read_log(runs["splitmask"]) if r["step"] > 5}
    assert resumed == reference
