"""The real `accelerate launch tools/train.py` with 2 CPU processes on DDP, FSDP2, ZeRO-2, ZeRO-3.

Each launch trains the supervised quickstart recipe (tiny ViT) on real Fashion-MNIST shards and
must really run the requested backend with 2 processes (accelerate falls back silently, so
run.json is checked), learn, checkpoint, evaluate and export a backbone timm can load. All four
see the same data and initial weights in fp32, so their per-step losses must agree with DDP's.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.models.export import timm_pretrained_kwargs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from e2e.conftest import FAST, RECIPE, read_log  # noqa: E402

pytestmark = pytest.mark.dist

LAUNCH_CONFIGS = {"ddp": "cpu_2proc.yaml", "fsdp2": "fsdp2.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, out: Path, train: Path, val: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", DIST_SSL_PROGRESS="0", ACCELERATE_USE_CPU="true")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dist_ssl" / "torch_extensions"))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch",
           "--config_file", str(REPO / "recipes" / "accelerate" / LAUNCH_CONFIGS[backend]),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(REPO / "tools" / "train.py"), str(RECIPE), f"output_dir={out}", f"data.train={train}",
           f"data.val={val}", *FAST, "model.drop_path=0.0", f"train.steps={STEPS}", "ckpt.every_steps=3"]
    # a cold DeepSpeed op compile takes minutes on 2 cores; it is cached afterwards
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist2k_shards, fmnist_test_shards_small):
    done = {}

    def get(backend: str) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp(backend) / "run"
            proc = launch(backend, out, fmnist2k_shards, fmnist_test_shards_small)
            assert proc.returncode == 0, f"{backend}: rc={proc.returncode}\n{proc.stderr[-4000:]}"
            (out.parent / "launch.log").write_text(proc.stdout + proc.stderr)
            done[backend] = out
        return done[backend]

    return get


@pytest.mark.parametrize("backend", list(LAUNCH_CONFIGS))
def test_backend_trains_through_the_cli(backend, runs):
    out = runs(backend)
    info = json.loads((out / "run.json").read_text())
    assert (info["backend"], info["num_processes"]) == (backend, 2)
    assert info["distributed_type"] == ("MULTI_CPU" if backend == "ddp" else
                                        "FSDP" if backend == "fsdp2" else "DEEPSPEED")
    assert info["global_batch"] == 64
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert json.loads((out / "eval.json").read_text())["num_samples"] == 500
    model = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(out / "backbone.safetensors"))
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 96)
    if backend != "ddp":  # same data, same initial weights, fp32: the same trajectory as DDP
        reference = [r["loss"] for r in read_log(runs("ddp"))]
        assert losses == pytest.approx(reference, rel=1e-4), (losses, reference)


def test_launch_output_is_quiet(runs):
    """Third-party loggers stay at WARNING: no DeepSpeed "Setting accelerator to CPU" from the
    trainers (one per rank before), no accelerate / DeepSpeed INFO lines (five per checkpoint
    before). The one such line left is `accelerate launch`'s own, printed when the launcher
    imports DeepSpeed before any trainer starts (DS_ACCELERATOR=cpu in its env silences it)."""
    text = (runs("zero2").parent / "launch.log").read_text()
    assert text.count("Setting accelerator to CPU") <= 1, text[:3000]
    noise = [ln for ln in text.splitlines()
             if "[INFO]" in ln or re.search(r" INFO (accelerate|torch|DeepSpeed|deepspeed)[.:]", ln)]
    assert not noise, noise[:10]
    assert "INFO dist_ssl.engine.checkpoint: checkpoint saved" in text  # our own INFO lines stay
