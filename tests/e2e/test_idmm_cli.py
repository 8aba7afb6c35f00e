"""IDMM through the real CLI on real Fashion-MNIST shards: 2-process pre-training with the
sharded instance classifier (`accelerate launch`), resume with 1 process (the classifier and its
AdamW state re-sharded), then supervised fine-tuning from the exported backbone.

Pre-training uses 125 real images (an odd N: shards of 63 + 62 classes) so that a few steps
see every instance several times and the instance-discrimination loss visibly drops.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.models.export import timm_pretrained_kwargs
from dist_ssl.parallel.sharded_fc import init_rows

from .conftest import REPO, read_log, train_env

pytestmark = pytest.mark.dist

N, N0 = 125, 63  # instances; rank 0's shard (rank 1: 62)
# CPU-sized: 16 px global crops, 8 px local crops, a 0.46M-parameter ViT, a high lr so that a
# few steps visibly lower the loss.
FAST = ["model.name=vit_pico_patch4_28", "model.img_size=16", "model.drop_path=0.0",
        "method.global_size=16", "method.local_size=8", "method.local_crops=2",
        "train.batch_size=32", "data.num_workers=1", "metrics.log_every_steps=1",
        "optim.warmup_epochs=null", "optim.warmup_steps=1", "optim.lr=5e-3", "optim.schedule=constant"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: Path, train: Path, *extra: str) -> list[str]:
    return [str(REPO / "tools" / "train.py"), str(REPO / "recipes" / "idmm_fmnist2k.yaml"),
            f"output_dir={out}", f"data.train={train}", *FAST, *extra]


def _shard(step_dir: Path, rank: int) -> dict:
    """One rank's rank-local state: {"modules": {"classifier": ...}, "optimizer", "scheduler", ...}."""
    return torch.load(step_dir / f"rank_local_{rank:05d}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fmnist125(fmnist_dir, tmp_path_factory) -> Path:
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("fmnist125") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, split="train", subset=f"random:{N}", samples_per_shard=32, seed=0)
    return out


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory, fmnist125) -> Path:
    out = tmp_path_factory.mktemp("idmm2") / "run"
    env = {k: v for k, v in train_env().items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(ACCELERATE_USE_CPU="true")
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch",
           "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           *_args(out, fmnist125, "train.steps=6", "ckpt.every_steps=3")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_processes_shard_the_classifier_and_learn(two_proc_run):
    info = json.loads((two_proc_run / "run.json").read_text())
    assert (info["method"], info["backend"], info["num_processes"]) == ("idmm", "ddp", 2)
    assert info["num_samples"] == N and info["global_batch"] == 64
    rows = read_log(two_proc_run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    # two crop groups, each starting near log N (uniform over 2,040 instances)
    assert losses[0] == pytest.approx(2 * math.log(N), abs=0.3)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert all({"ce_global", "ce_local", "lam"} <= set(r) for r in rows)
    step = two_proc_run / "checkpoints" / "step_00000006"
    for rank, (start, rows_) in enumerate(((0, N0), (N0, N - N0))):  # each rank saved only its rows
        mod = _shard(step, rank)["modules"]["classifier"]
        assert mod["weight"].shape == (rows_, 96) and (mod["shard_start"], mod["num_classes"]) == (start, N)
        adam = _shard(step, rank)["optimizer"]["state"]
        assert [s["exp_avg"].shape[0] for s in adam.values()] == [rows_]
    assert not (step / "rank_local_00002.pt").exists()
    # the exported backbone has bare timm names (no wrapper / classifier keys) and loads in timm
    model = timm.create_model("vit_pico_patch4_28", in_chans=1, img_size=16,
                              **timm_pretrained_kwargs(two_proc_run / "backbone.safetensors"))
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 96)


def test_resume_with_one_process_reshards_then_finetune(two_proc_run, tmp_path, fmnist125, fmnist2k_shards,
                                                        fmnist_test_shards_small):
    out = tmp_path / "run"
    shutil.copytree(two_proc_run, out)
    saved = out / "checkpoints" / "step_00000006"
    w6 = torch.cat([_shard(saved, r)["modules"]["classifier"]["weight"] for r in range(2)])
    # 1 process x 32 would halve the global batch (2 x 32): the step counter would then mean other
    # samples and another lr, so that resume is refused with one line ...
    proc = subprocess.run([sys.executable, *_args(out, fmnist125, "train.steps=8", "ckpt.every_steps=4")],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "written with global batch 64 (2 processes), this run has 32" in proc.stderr.strip().splitlines()[-1]
    # ... and 1 process x 64 (the same global batch) resumes, re-sharding the classifier
    proc = subprocess.run([sys.executable, *_args(out, fmnist125, "train.steps=8", "ckpt.every_steps=4",
                                                  "train.batch_size=64")],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at step 6" in proc.stderr
    assert json.loads((out / "run.json").read_text())["num_processes"] == 1
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the 2-process rows, then 7 and 8
    assert all(math.isfinite(r["loss"]) for r in rows[6:])
    final = out / "checkpoints" / "step_00000008"
    mod = _shard(final, 0)["modules"]["classifier"]
    assert mod["weight"].shape == (N, 96) and mod["shard_start"] == 0
    assert not (final / "rank_local_00001.pt").exists()
    adam = next(iter(_shard(final, 0)["optimizer"]["state"].values()))
    assert adam["exp_avg"].shape[0] == N and float(adam["step"]) == 8  # AdamW state re-sharded, not reset
    # W continued from the two shards: 2 steps from w6, 8 from the init (the same full W for any
    # world size); a resume that silently re-initialised W would be 2 steps from the init instead
    w8, w_init = mod["weight"], init_rows(0, 0, N, 96, 0.02)
    assert (w8 - w6).abs().mean() < (w8 - w_init).abs().mean()

    ft = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "recipes" / "finetune_fmnist2k.yaml"),
         f"output_dir={ft}", f"data.train={fmnist2k_shards}", f"data.val={fmnist_test_shards_small}",
         f"method.init_from={out}", "train.steps=2", "train.batch_size=32", "data.num_workers=1",
         "optim.warmup_epochs=null", "optim.warmup_steps=1"],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resampled ['pos_embed']" in proc.stderr  # 16 px pre-training grid -> 28 px
    assert json.loads((ft / "eval.json").read_text())["num_samples"] == 500
    assert os.path.getsize(ft / "backbone.safetensors") > 0
