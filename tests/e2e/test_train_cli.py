"""The real `tools/train.py` on real Fashion-MNIST shards, single process."""
from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.config.run import reload_saved_config
from dist_ssl.models.export import timm_pretrained_kwargs

from dist_ssl.step_schedules import cosine

from .conftest import BASELINE, REPO, read_log, run_train, train_args, train_env


def test_run_writes_everything_and_learns(baseline_run):
    rows = read_log(baseline_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("epoch", "loss", "lr", "images_per_sec", "step_time", "data_wait_fraction",
                "samples_seen", "mem_peak_bytes"):
        assert all(key in r for r in rows), key
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    info = json.loads((baseline_run / "run.json").read_text())
    assert info["backend"] == "single" and info["num_processes"] == 1
    assert info["global_batch"] == 32 and info["num_samples"] == 2040 and info["total_steps"] == 12
    assert math.isclose(info["lr"], 2e-3 * 32 / 256)
    cfg = reload_saved_config(baseline_run / "config.yaml")
    assert cfg.train.steps == 12 and cfg.model.name == "vit_pico_patch4_28"
    # weight decay of each step: cosine from optim.weight_decay to optim.weight_decay_end
    assert [r["weight_decay"] for r in rows] == [cosine(s - 1, 12, cfg.optim.weight_decay, 0.5) for s in range(1, 13)]
    assert rows[0]["weight_decay"] == pytest.approx(cfg.optim.weight_decay) and rows[-1]["weight_decay"] > 0.45
    result = json.loads((baseline_run / "eval.json").read_text())
    assert result["num_samples"] == 500 and 0.15 < result["top1"] <= result["top5"] <= 1.0
    kept = sorted(p.name for p in (baseline_run / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000008", "step_00000012"]


def test_backbone_export_loads_in_timm(baseline_run):
    path = baseline_run / "backbone.safetensors"
    model = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(path)).eval()
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 96)
    from safetensors.torch import load_file
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"],
                       load_file(path)["blocks.0.attn.qkv.weight"])
    # a supervised run also writes its classifier beside it, for a continuation (method.init_head)
    head = load_file(baseline_run / "head.safetensors")
    assert head["head.weight"].shape == (10, 96) and "head.weight" not in load_file(path)


def _wait_for_rows(out, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        log = out / "log.jsonl"
        if log.exists() and len(read_log(out)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} log rows within {timeout}s")


def test_sigterm_checkpoints_and_resume_is_bit_exact(tmp_path, baseline_run, fmnist2k_shards,
                                                     fmnist_test_shards_small):
    out = tmp_path / "run"
    args = train_args(out, fmnist2k_shards, fmnist_test_shards_small, *BASELINE)
    proc = subprocess.Popen(args, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(out, 5, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    stopped = max(r["step"] for r in read_log(out))
    assert 5 <= stopped < 12
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    proc2 = subprocess.run(args, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    resumed = {r["step"]: r["loss"] for r in read_log(out)}
    reference = {r["step"]: r["loss"] for r in read_log(baseline_run)}
    assert resumed == reference  # bit-for-bit on CPU, every step
    assert json.loads((out / "eval.json").read_text()) == json.loads((baseline_run / "eval.json").read_text())


def test_bad_config_is_one_line_error(tmp_path, fmnist2k_shards):
    proc = run_train(tmp_path / "run", fmnist2k_shards, None, "train.epoch=3")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1] == 'train.py: error: train.epoch: unknown key (did you mean "epochs"?)'
    proc = run_train(tmp_path / "run", tmp_path / "missing", None, "train.steps=1")
    assert proc.returncode == 2 and "manifest" in proc.stderr.strip().splitlines()[-1]


def test_corrupt_checkpoint_is_named(tmp_path, baseline_run, fmnist2k_shards):
    out = tmp_path / "run"
    shutil.copytree(baseline_run, out)
    weights = out / "checkpoints" / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run_train(out, fmnist2k_shards, None, "train.steps=16", "ckpt.every_steps=4")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert str(weights) in last and last.startswith("train.py: error:"), last


def test_resume_past_the_end_says_nothing_is_left(tmp_path, baseline_run, fmnist2k_shards):
    out = tmp_path / "run"
    shutil.copytree(baseline_run, out)
    proc = run_train(out, fmnist2k_shards, None, *BASELINE[1:], "train.steps=4")  # checkpoint is at 12
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at or past this run's 4 total steps: nothing left to train" in proc.stderr
    assert [r["step"] for r in read_log(out)] == list(range(1, 13))  # no new training rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_scraped_during_run(tmp_path, fmnist2k_shards):
    port = _free_port()
    out = tmp_path / "run"
    args = train_args(out, fmnist2k_shards, None, "train.steps=400", "ckpt.every_steps=1000",
                      "metrics.prometheus=true", f"metrics.prometheus_port_base={port}")
    proc = subprocess.Popen(args, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(out, 3, proc)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    lines = [line for line in body.splitlines() if line.startswith("dist_ssl_step{")]
    assert lines and 'run="run"' in lines[0] and 'rank="0"' in lines[0], body[:2000]
    assert float(lines[0].split()[-1]) >= 3
    assert any(line.startswith("dist_ssl_images_per_second{") for line in body.splitlines())


def test_finetune_from_backbone_at_new_resolution(tmp_path, baseline_run, fmnist2k_shards,
                                                  fmnist_test_shards_small):
    out = tmp_path / "ft"
    proc = run_train(out, fmnist2k_shards, fmnist_test_shards_small, "train.steps=2",
                     f"method.init_from={baseline_run}", "model.img_size=56", "method.init_head=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resampled ['pos_embed']" in proc.stderr
    assert "classifier loaded from head.safetensors (10 classes)" in proc.stderr  # the 448-style continuation
    from safetensors.torch import load_file
    assert load_file(out / "backbone.safetensors")["pos_embed"].shape == (1, 1 + 14 * 14, 96)
    assert json.loads((out / "eval.json").read_text())["num_samples"] == 500
