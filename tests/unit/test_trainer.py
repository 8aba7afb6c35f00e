"""The Trainer in-process on prebuilt parts (world size 1 accelerate on CPU, no subprocess): a
short IDMM run (data-parallel student + rank-local sharded classifier) writes its log and
checkpoints, stops at the next preemption check after a signal, refuses a resume with another
global batch before reading anything, and resumes to exactly the uninterrupted run's losses."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from dist_ssl.config import load_config
from dist_ssl.engine.checkpoint import CheckpointError, CheckpointManager
from dist_ssl.engine.preemption import REQUEUE_EXIT_CODE
from dist_ssl.engine.setup import build_run
from dist_ssl.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
N = 48  # training images = IDMM instance classes
STEPS = 6
FAST = ["train.batch_size=8", f"train.steps={STEPS}", "ckpt.every_steps=2", "data.num_workers=0",
        "method.local_crops=2", "metrics.log_every_steps=1", "optim.warmup_epochs=null", "optim.warmup_steps=1",
        "train.preemption_check_steps=2"]


@pytest.fixture(scope="module")
def tiny_shards(fmnist_dir, tmp_path_factory) -> Path:
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("fmnist48") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, split="train", subset=f"random:{N}", samples_per_shard=16, seed=0)
    return out


def config(out: Path, shards: Path, *extra: str):
    return load_config(REPO / "recipes" / "idmm_fmnist2k.yaml",
                       [f"output_dir={out}", f"data.train={shards}", *FAST, *extra])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cfg = config(out, tiny_shards)
    parts = build_run(cfg)
    trainer = Trainer(cfg, parts=parts)
    assert trainer.parts is parts  # nothing rebuilt
    assert trainer.fit() == 0
    return out


def test_fit_writes_log_checkpoint_with_rank_local_state(reference):
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    step = reference / "checkpoints" / f"step_{STEPS:08d}"
    assert (step / "COMPLETE").is_file() and (step / "shared_method.pt").is_file()
    local = torch.load(step / "rank_local_00000.pt", map_location="cpu", weights_only=True)
    fc = local["modules"]["classifier"]
    assert (local["rank"], local["world_size"], fc["shard_start"], fc["num_classes"]) == (0, 1, 0, N)
    assert fc["weight"].shape == (N, 96)
    adam = next(iter(local["optimizer"]["state"].values()))
    assert adam["exp_avg"].shape == (N, 96) and float(adam["step"]) == STEPS
    assert local["scheduler"]["last_epoch"] == STEPS
    assert not list(step.glob("rank_local_0000[1-9].pt"))
    assert (reference / "backbone.safetensors").is_file()


def test_preempted_at_the_next_check_then_resumed_exactly(reference, tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(out, tiny_shards)
    parts = build_run(cfg)
    after_step = parts.method.after_step

    def signalled_after_step_3(step):  # SLURM's USR1 lands during step 3
        after_step(step)
        if step == 3:
            signal.raise_signal(signal.SIGUSR1)

    parts.method.after_step = signalled_after_step_3
    assert Trainer(cfg, parts=parts).fit() == REQUEUE_EXIT_CODE
    assert sorted(losses(out)) == [1, 2, 3, 4]  # checked every 2 steps: stops after step 4, not 3
    assert CheckpointManager(out).latest().name == "step_00000004"

    # another global batch means other samples and lr per step: refused before anything is read
    # or written (the run dir keeps the config it was trained with)
    saved_config = (out / "config.yaml").read_text()
    monkeypatch.setattr(CheckpointManager, "load", lambda *a, **k: pytest.fail("load called"))
    smaller = config(out, tiny_shards, "train.batch_size=4")
    with pytest.raises(CheckpointError, match="written with global batch 8 .* this run has 4"):
        Trainer(smaller).fit()
    monkeypatch.undo()
    assert (out / "config.yaml").read_text() == saved_config

    assert Trainer(cfg).fit() == 0
    assert losses(out) == losses(reference)  # every step, bit for bit
