"""SimCLR / SupCon / MoCo v2 / MoCo v3 / DINO through the real `tools/train.py` on real
Fashion-MNIST shards (single process, tiny ViT, 12-16 steps each).

Per method, one run: finite loss that decreases, checkpoints that carry the method state
(teacher, queue, center) and show the teacher moving, a backbone export timm loads. MoCo v2
(queue + pointer + teacher, the most state) is also resumed from a mid-run checkpoint: the
resumed run must reproduce the uninterrupted losses and final method state bit for bit.

The overrides below are test settings (small heads, lr and schedules that show learning within
a few steps), not recipes; the recipes themselves are validated in tests/unit.
"""
from __future__ import annotations

import math
import shutil
import sys

import pytest
import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.models.export import timm_pretrained_kwargs

from .conftest import REPO, read_log, train_in_parallel

# data.num_workers=0: decoding 28 px crops is cheap, a worker process would cost more to start.
COMMON = ["model.name=vit_pico_patch4_28", "train.batch_size=32", "data.num_workers=0", "data.val=null",
          "metrics.log_every_steps=1", "optim.warmup_epochs=null", "optim.warmup_steps=2", "ckpt.keep_last=5"]
# method -> (steps, checkpoint every, (skip, window): mean of steps skip+1 .. skip+window must
# exceed the mean of the last `window` steps, overrides)
RUNS = {
    "simclr": (12, 6, (0, 3), ["optim.base_lr=2e-3", "method.proj_hidden_dim=256"]),
    "supcon": (12, 6, (0, 3), ["optim.base_lr=2e-3", "method.proj_hidden_dim=256"]),
    # MoCo v2 learns slowly from scratch (no BN in its head; the loss sits near log(1 + K) for
    # dozens of steps under strong crops), so: full-image crops (photometric views only), a queue
    # of 1.5 global batches (the pointer wraps mid-queue: 14 x 32 = 448 = 9 x 48 + 16), and
    # step 1 left out (it contrasts with the random initial queue).
    "mocov2": (20, 14, (1, 5), ["optim.base_lr=2.4e-3", "method.proj_hidden_dim=256", "method.queue_size=48",
                                "method.momentum=0.99", "method.crop_scale=[1.0,1.0]"]),
    "mocov3": (12, 6, (0, 3), ["optim.base_lr=2e-3", "method.proj_hidden_dim=256"]),
    # DINO: a sharp constant teacher temperature and a fast teacher; 10 steps (on this tiny model
    # the centred loss climbs back towards log K after ~12 steps at this lr)
    "dino": (10, 5, (0, 3), ["optim.base_lr=2e-2", "method.out_dim=64", "method.teacher_temp=0.04",
                             "method.warmup_teacher_temp_epochs=0", "method.freeze_last_layer_epochs=0",
                             "method.momentum=0.99", "method.local_crops=2"]),
}
STATE = {"simclr": (), "supcon": (), "mocov2": ("queue", "queue_ptr", "teacher."),
         "mocov3": ("teacher.",), "dino": ("loss.center", "teacher.")}


def _args(name: str, out, shards) -> list[str]:
    steps, every, _, overrides = RUNS[name]
    return [sys.executable, str(REPO / "tools" / "train.py"), str(REPO / "recipes" / f"{name}_fmnist2k.yaml"),
            f"output_dir={out}", f"data.train={shards}", *COMMON, f"train.steps={steps}",
            f"ckpt.every_steps={every}", *overrides]


def method_state(run, step: int) -> dict[str, torch.Tensor]:
    """The method's checkpointed state (Method.extra_state_dict) at ``step``."""
    path = run / "checkpoints" / f"step_{step:08d}" / "shared_method.pt"
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist2k_shards) -> dict:
    """All five runs, two at a time, MoCo v2 first, then its resume from the step-14 checkpoint
    ("mocov2_resumed", filling the core the last run leaves idle); name -> run directory."""
    root = tmp_path_factory.mktemp("contrastive_cli")
    order = ["mocov2"] + [name for name in RUNS if name != "mocov2"]
    jobs = {name: (_args(name, root / name, fmnist2k_shards), root / name) for name in order}
    resumed, every = root / "mocov2_resumed", RUNS["mocov2"][1]
    ckpt = f"checkpoints/step_{every:08d}"
    jobs["mocov2_resumed"] = (_args("mocov2", resumed, fmnist2k_shards), resumed)

    def copy_checkpoint():
        shutil.copytree(root / "mocov2" / ckpt, resumed / ckpt)

    train_in_parallel(jobs, after={"mocov2_resumed": ("mocov2", copy_checkpoint)})
    return {name: out for name, (_, out) in jobs.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_method_trains_checkpoints_and_exports(runs, name):
    run = runs[name]
    steps, every, (skip, window), _ = RUNS[name]
    rows = read_log(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses), losses
    first, last = losses[skip:skip + window], losses[-window:]
    assert sum(last) / window < sum(first) / window - 0.1, losses
    # checkpointed method state: the declared pieces, moving between checkpoints
    mid, end = method_state(run, every), method_state(run, steps)
    assert all(any(k.startswith(p) for k in end) for p in STATE[name]), sorted(end)[:8]
    assert not any(k.startswith("student.") for k in end)
    teacher = [k for k in end if k.startswith("teacher.")]
    assert bool(teacher) == ("teacher." in STATE[name])
    moved = [k for k in teacher if not torch.equal(mid[k], end[k])]
    assert len(moved) >= 0.9 * len(teacher), sorted(set(teacher) - set(moved))  # MoCo v3: patch embed frozen
    if name == "mocov2":
        assert int(mid["queue_ptr"]) == every * 32 % 48 and int(end["queue_ptr"]) == steps * 32 % 48
        assert not torch.equal(mid["queue"], end["queue"])
    if name == "dino":
        assert not torch.equal(mid["loss.center"], end["loss.center"]) and end["loss.center"].abs().sum() > 0
    # the backbone (not the heads) is exported in a form timm loads
    path = run / "backbone.safetensors"
    model = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(path)).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 96)


def test_mocov2_resume_restores_queue_and_teacher_exactly(runs):
    base, out = runs["mocov2"], runs["mocov2_resumed"]
    steps, every, _, _ = RUNS["mocov2"]
    resumed = {r["step"]: r["loss"] for r in read_log(out)}
    reference = {r["step"]: r["loss"] for r in read_log(base)}
    assert sorted(resumed) == list(range(every + 1, steps + 1))
    assert resumed == {s: reference[s] for s in resumed}  # bit-for-bit on CPU, every step
    final, expected = method_state(out, steps), method_state(base, steps)
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
