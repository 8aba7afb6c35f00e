"""One IDMM training step in 2 gloo processes (DDP backbone + sharded instance classifier)
equals the same step in one process on the same global batch.

Each rank builds the method for its (rank, world size) from the same seed (the classifier's
full W does not depend on the world size), CutMixes its half of the batch with its own
(seed, rank, step) draw, and takes one AdamW step. The single-process reference mixes each half
with that rank's draw, concatenates the halves and steps on the whole batch. Loss, backbone
gradients and parameters after the step, and the gathered W must agree. N = 37 is odd, so the
shards are uneven (19 + 18); the second scenario also gives the ranks uneven batches. The even
one tells the method so (``equal_rank_batches``, as the engine does): no size gather.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ssl.data.mixing import MixedBatch
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.idmm import IDMMConfig
from dist_ssl.models.config import ModelConfig

pytestmark = pytest.mark.dist

WORLD, N, STEP = 2, 37, 3
SCENARIOS = {"even": (5, 5), "uneven": (6, 3)}  # images per rank
CFG = dict(global_size=16, local_size=8, local_crops=2, seed=11, logit_chunk=7, classifier_bias=True)


def build(world_size: int, rank: int, equal_rank_batches: bool = False):
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=16, in_chans=1, dynamic_img_size=True),
                        num_samples=N, num_classes=10, in_chans=1, world_size=world_size, rank=rank,
                        equal_rank_batches=equal_rank_batches)
    torch.manual_seed(0)  # identical backbone init everywhere
    return build_method(IDMMConfig(**CFG), ctx)


def global_batch(sizes) -> dict:
    g = torch.Generator().manual_seed(5)
    method = build(1, 0)
    b = sum(sizes)
    views = [torch.randn(b, 1, grp.size, grp.size, generator=g) for grp in method.train_views().view_groups]
    return {"index": torch.randperm(N, generator=g)[:b], "views": views}


def split(batch: dict, sizes, rank: int) -> dict:
    lo = sum(sizes[:rank])
    return {"index": batch["index"][lo:lo + sizes[rank]], "views": [v[lo:lo + sizes[rank]] for v in batch["views"]]}


def optimizers(method):
    # eps 1e-6, not 1e-8: Adam's first step is lr * g / (|g| + eps), so a gradient that is zero
    # up to rounding (the key bias of attention: softmax is shift-invariant) would become +-lr
    # with a sign decided by summation order; real gradients here are >> 1e-6.
    kw = dict(lr=1e-3, weight_decay=0.05, eps=1e-6)
    return (torch.optim.AdamW(method.student.parameters(), **kw),
            torch.optim.AdamW(method.classifier.parameters(), **kw))


def backbone_of(method) -> dict:
    student = method.student.module if isinstance(method.student, DDP) else method.student
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name, sizes in SCENARIOS.items():
        method = build(WORLD, rank, equal_rank_batches=name == "even")  # as the engine says for its batches
        method.student = DDP(method.student)
        opt, local_opt = optimizers(method)
        out = method(split(global_batch(sizes), sizes, rank), STEP)
        out["loss"].backward()
        grads = {k: p.grad.clone() for k, p in method.student.module.named_parameters()}
        opt.step()
        local_opt.step()
        results[name] = {"loss": out["loss"].detach(), "grads": grads, "params": backbone_of(method),
                         "W": method.classifier.full_weight().clone(),
                         "n_local": method.classifier.n_local}
        losses = [None] * WORLD
        dist.all_gather_object(losses, out["loss"].item())
        results[name]["losses"] = losses
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def reference(sizes) -> dict:
    method = build(1, 0)
    batch = global_batch(sizes)
    halves = [method.mix(split(batch, sizes, r)["views"], split(batch, sizes, r)["index"], STEP, rank=r)
              for r in range(WORLD)]
    merged = [MixedBatch(*(torch.cat([getattr(h[g], f) for h in halves])
                           for f in ("images", "target_a", "target_b", "lam", "perm")), box=(0, 0, 0, 0))
              for g in range(len(halves[0]))]
    opt, local_opt = optimizers(method)
    out = method.loss(merged)
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in method.student.named_parameters()}
    opt.step()
    local_opt.step()
    return {"loss": out["loss"].detach(), "grads": grads, "params": backbone_of(method),
            "W": method.classifier.weight.detach().clone()}


@pytest.mark.timeout(240)
def test_two_process_step_equals_one_process_step(tmp_path):
    out_file = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True,
                       start_method="spawn")
    got = torch.load(out_file, weights_only=False)
    for name, sizes in SCENARIOS.items():
        res, ref = got[name], reference(sizes)
        assert res["n_local"] == 19  # rank 0's shard of 37 classes (rank 1: 18)
        assert res["losses"][0] == res["losses"][1]  # the global loss on every rank
        assert res["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5), name
        for k in ref["grads"]:
            torch.testing.assert_close(res["grads"][k], ref["grads"][k], atol=1e-6, rtol=1e-4, msg=f"{name} grad {k}")
        for k in ref["params"]:
            torch.testing.assert_close(res["params"][k], ref["params"][k], atol=1e-5, rtol=0, msg=f"{name} {k}")
        assert not torch.equal(res["W"], build(1, 0).classifier.weight)  # the step moved W
        torch.testing.assert_close(res["W"], ref["W"], atol=1e-5, rtol=0, msg=f"{name} W")
