"""Helpers for running the real `tools/train.py` CLI on real Fashion-MNIST shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "supervised_fmnist2k.yaml"
# A tiny, fast configuration of the quickstart recipe (0.46M-parameter ViT).
FAST = ["model.name=vit_pico_patch4_28", "model.drop_path=0.1", "train.batch_size=32",
        "data.num_workers=1", "metrics.log_every_steps=1", "optim.warmup_epochs=null",
        "optim.warmup_steps=2",
        "optim.base_lr=2e-3"]


# the baseline run: 12 steps, checkpoints every 4, a weight-decay schedule (checked in its log
# and, through the SIGTERM/resume test, resumed exactly)
BASELINE = ["train.steps=12", "ckpt.every_steps=4", "optim.weight_decay_end=0.5"]


def train_env() -> dict:
    env = dict(os.environ, DIST_SSL_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def train_args(out: Path, train: Path, val: Path | None, *overrides: str) -> list[str]:
    args = [sys.executable, str(REPO / "tools" / "train.py"), str(RECIPE), f"output_dir={out}",
            f"data.train={train}", *FAST]
    args.append(f"data.val={val}" if val else "data.val=null")
    return args + list(overrides)


def run_train(out: Path, train: Path, val: Path | None, *overrides: str, timeout: int = 300):
    return subprocess.run(train_args(out, train, val, *overrides), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_log(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def train_in_parallel(jobs: dict, parallel: int = 2, timeout: float = 600, after: dict | None = None) -> None:
    """Run the CLI commands of ``jobs`` (name -> (args, out dir)), ``parallel`` at a time, in
    order: each run is single-threaded (OMP_NUM_THREADS=1, no loader workers), so 2 fill the 2 CI
    cores. ``after``: name -> (the job it needs, a callable run just before it starts), e.g. a
    resume from another run's checkpoint, which then fills a core instead of running alone."""
    after = after or {}
    pending, running, done, failed = list(jobs.items()), {}, set(), {}
    deadline = time.monotonic() + timeout
    while pending or running:
        for name, (args, out) in list(pending):
            if len(running) >= parallel:
                break
            need, prepare = after.get(name, (None, None))
            if need in failed:
                pending.remove((name, (args, out)))
                failed[name] = f"not run: {need} failed"
            elif need is None or need in done:
                pending.remove((name, (args, out)))
                if prepare:
                    prepare()
                out.mkdir(parents=True, exist_ok=True)
                log = open(out.parent / f"{name}.stderr", "w")
                running[name] = (subprocess.Popen(args, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                                                  stderr=log), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode != 0:
                    failed[name] = (proc.returncode, Path(log.name).read_text()[-3000:])
                else:
                    done.add(name)
        if time.monotonic() > deadline:
            for proc, _ in running.values():
                proc.kill()
            pytest.fail(f"CLI runs still going after {timeout}s: {sorted(running)}")
        time.sleep(0.2)
    assert not failed, failed


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, fmnist2k_shards, fmnist_test_shards_small) -> Path:
    """One uninterrupted 12-step single-process run; several tests compare against it."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = run_train(out, fmnist2k_shards, fmnist_test_shards_small, *BASELINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
