"""Worker for tests/dist/test_contrastive_dist.py: one rank of a 2-process gloo group.

For every method it builds the same tiny model as the single-process reference, wraps the
student in DDP, runs one step on ITS HALF of a fixed global batch (loss, backward, a plain SGD
step, ``after_step``) and saves what the test compares with the reference on the whole batch:
the rank's loss, the DDP-averaged gradients, and the method state after the step (teacher,
MoCo v2 queue, DINO center). DINO runs once more with the student sharded by FSDP2
(per-block + root ``fully_shard``), and the contrastive losses run on an uneven 3 + 5 split, and
on a 4 + 4 split with and without ``equal_batches`` (counting all_gathers).
The methods see ``equal_rank_batches=True`` as under the engine (the halves are equal).
"""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_ssl.config.registry import variants
from dist_ssl.methods import MethodConfig, MethodContext, build_method
from dist_ssl.models.config import ModelConfig
from dist_ssl.parallel.global_batchnorm import convert_to_global_batchnorm

from _worker_common import counting_all_gathers  # tests/dist is on sys.path (put there by the test)

WORLD, GLOBAL_B, LR = 2, 8, 0.5
# Heads without BatchNorm: per-process BN statistics would (correctly) differ from one process.
CONFIGS: dict[str, dict[str, Any]] = {
    "simclr": dict(proj_hidden_dim=32, proj_dim=16, head_norm="none"),
    "supcon": dict(proj_hidden_dim=32, proj_dim=16, head_norm="none"),
    "mocov2": dict(proj_hidden_dim=32, proj_dim=16, queue_size=24),
    "mocov3": dict(proj_hidden_dim=32, proj_dim=16, head_norm="none"),
    "dino": dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_crop_size=12,
                 freeze_last_layer_epochs=0),
    # BatchNorm heads: the ranks run GlobalBatchNorm (as the engine converts them), the reference
    # plain BatchNorm on the whole batch
    "simclr_bn": dict(proj_hidden_dim=32, proj_dim=16, head_norm="bn"),
    "mocov3_bn": dict(proj_hidden_dim=32, proj_dim=16, head_norm="bn"),
}


def make_method(name: str):
    torch.manual_seed(0)  # identical weights, queue and heads on every rank and in the reference
    cfg = variants(MethodConfig)[name.removesuffix("_bn")](**CONFIGS[name])
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1),
                        num_samples=64, num_classes=10, in_chans=1, total_steps=10, steps_per_epoch=5,
                        equal_rank_batches=True)
    return build_method(cfg, ctx)


def global_batch(method) -> dict:
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(GLOBAL_B, 1, grp.size, grp.size, generator=g) for grp in method.train_views().view_groups]
    return {"views": views, "label": torch.tensor([0, 1, 2, 0, 1, 0, 3, 1]), "index": torch.arange(GLOBAL_B)}


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_B // world
    sl = slice(rank * n, (rank + 1) * n)
    return {"views": [v[sl] for v in batch["views"]], "label": batch["label"][sl], "index": batch["index"][sl]}


def one_step(method, batch: dict, student_params) -> dict:
    """Loss, gradients, SGD step, after_step; what the test compares."""
    out = method(batch, step=0)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in student_params if p.grad is not None}
    with torch.no_grad():
        for _, p in student_params:
            if p.grad is not None:
                p.sub_(LR * p.grad)
    method.after_step(1)
    state = {k: v.detach().clone() for k, v in method.extra_state_dict().items()}
    return {"loss": out["loss"].item(), "grads": grads, "state": state}


def fsdp2_step(rank: int) -> dict:
    """DINO's step with the student sharded by FSDP2 (per block + root), as accelerate does:
    multi-resolution forward, reduce-scattered gradients, teacher update via full_tensor()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    method = make_method("dino")
    batch = rank_slice(global_batch(method), rank, WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in method.student.backbone.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(method.student, mesh=mesh)
    params = list(method.student.named_parameters())
    result = one_step(method, batch, params)
    result["grads"] = {n: g.full_tensor() for n, g in result["grads"].items()}
    result["dtensor_params"] = sum(hasattr(p, "full_tensor") for _, p in params)
    result["n_params"] = len(params)
    return result


# ----------------------------------------------------------------- losses, uneven shards
UNEVEN = (3, 5)  # rows on rank 0 and rank 1


def loss_sums(equal: bool = False):
    """name -> (fn(x, y) -> SUM of the per-anchor losses, number of (x, y) rows). Sums, not
    means: with uneven shards the sum over ranks is what equals the single-process sum.
    ``equal``: the losses' ``equal_batches`` (only for equal shards)."""
    from dist_ssl.losses.info_nce import global_info_nce, nt_xent
    from dist_ssl.losses.supcon import supcon_loss

    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1])
    return {
        "nt_xent": lambda x, y, sl: nt_xent(x, y, 0.3, equal_batches=equal) * 2 * x.shape[0],
        "supcon": lambda x, y, sl: supcon_loss([x, y], labels[sl], 0.3, equal_batches=equal) * 2 * x.shape[0],
        "global_info_nce": lambda x, y, sl: global_info_nce(x, y, 0.3, equal_batches=equal) * x.shape[0],
    }


def loss_inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(sum(UNEVEN), 6, generator=g), torch.randn(sum(UNEVEN), 6, generator=g)


def split_losses(rank: int, split: tuple[int, ...] = UNEVEN, equal: bool = False) -> dict:
    """Each loss on this rank's rows of a split: summed value, input gradients, all_gathers made."""
    start = sum(split[:rank])
    sl = slice(start, start + split[rank])
    x_all, y_all = loss_inputs()
    out = {}
    for name, fn in loss_sums(equal).items():
        x, y = x_all[sl].clone().requires_grad_(True), y_all[sl].clone().requires_grad_(True)
        with counting_all_gathers() as gathers:
            value = fn(x, y, sl)
            value.backward()
        out[name] = {"sum": value.item(), "grad_x": x.grad, "grad_y": y.grad, "all_gathers": gathers[0]}
    return out


def uneven_losses(rank: int) -> dict:
    return split_losses(rank)


def equal_losses(rank: int) -> dict:
    """4 + 4 rows, the sizes gathered ("gathered") or declared equal ("declared")."""
    half = (sum(UNEVEN) // WORLD,) * WORLD
    return {"gathered": split_losses(rank, half), "declared": split_losses(rank, half, equal=True)}


def run(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name in CONFIGS:
        method = make_method(name)
        batch = rank_slice(global_batch(method), rank, WORLD)
        _, results[f"{name}:global_bn"] = convert_to_global_batchnorm(method)  # what the engine does
        params = list(method.student.named_parameters())
        method.student = nn.parallel.DistributedDataParallel(method.student)
        results[name] = one_step(method, batch, params)
    for key, fn in (("uneven", uneven_losses), ("equal", equal_losses), ("dino_fsdp2", fsdp2_step)):
        try:  # recorded, not raised: the other results still reach the test
            results[key] = fn(rank)
        except Exception as exc:  # noqa: BLE001
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
