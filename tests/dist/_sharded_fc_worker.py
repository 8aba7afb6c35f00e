"""One rank of tests/dist/test_sharded_fc_dist.py: runs every case in one process group.

Each case draws the global batch from a generator seeded by the case index (the same on every
rank), takes this rank's rows and classes, and compares the sharded loss and gradients with a
dense float64 single-process reference. The largest errors go to ``OUT/rank_<r>.json``; the test
process asserts on them (so a failure names the case and the quantity). Each case also records
how many all_gathers the loss made: with ``equal_batches`` (rows "declared") there must be no
size gather, only the features and the targets.
"""

from __future__ import annotations

import itertools
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_ssl.parallel.sharded_fc import ShardedLinear, shard_range
from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

from _worker_common import counting_all_gathers  # tests/dist is on sys.path (put there by the test)

D = 8
CLASS_COUNTS = (7, 10, 1001)  # 7: shards 4+3 / 3+2+2, unequal enough to expose local-mean smoothing at P=2


def batch_sizes(world: int, uneven: bool) -> list[int]:
    """Rows per rank: equal, or uneven with an empty rank at P = 3."""
    if not uneven:
        return [4] * world
    return [3, 0, 5] if world == 3 else [1 + 2 * r for r in range(world)]


def cases(world: int):
    """rows: "equal" (sizes gathered anyway), "declared" (equal, and the caller says so:
    ``equal_batches=True``), "uneven"."""
    for i, (n, kind, eps, chunk, rows) in enumerate(
        itertools.product(CLASS_COUNTS, ("hard", "cutmix"), (0.0, 0.1), (None, 2), ("equal", "declared", "uneven"))
    ):
        yield dict(idx=i, n=n, kind=kind, eps=eps, chunk=chunk, sizes=batch_sizes(world, rows == "uneven"),
                   bias=bool(rows == "uneven" and chunk), equal_batches=rows == "declared")


def global_batch(case: dict):
    g = torch.Generator().manual_seed(1000 + case["idx"])
    m, n = sum(case["sizes"]), case["n"]
    x = torch.randn(m, D, generator=g)
    w = torch.randn(n, D, generator=g)
    bias = torch.randn(n, generator=g) if case["bias"] else None
    a = torch.randint(0, n, (m,), generator=g)
    if case["kind"] == "hard":
        return x, w, bias, a, a.clone(), torch.ones(m)
    b = (a + torch.randint(1, n, (m,), generator=g)) % n
    return x, w, bias, a, b, torch.rand(m, generator=g) * 0.9 + 0.05


def dense_reference(x, w, bias, a, b, lam, eps):
    """Loss and grads (features, weight, bias) of the dense soft-target CE, float64."""
    params = [t.double().requires_grad_(True) for t in (x, w) + ((bias,) if bias is not None else ())]
    n = w.shape[0]
    q = (1 - eps) * (lam.double()[:, None] * F.one_hot(a, n) + (1 - lam.double()[:, None]) * F.one_hot(b, n)) + eps / n
    logits = params[0] @ params[1].t() + (params[2] if bias is not None else 0)
    loss = -(q * F.log_softmax(logits, -1)).sum(-1).mean()
    return (loss.detach(), *torch.autograd.grad(loss, params))


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max()) if got.numel() else 0.0


def run_case(case: dict, rank: int, world: int) -> dict:
    x, w, bias, a, b, lam = global_batch(case)
    ref = dense_reference(x, w, bias, a, b, lam, case["eps"])
    lo = sum(case["sizes"][:rank])
    rows = slice(lo, lo + case["sizes"][rank])
    start, n_local = shard_range(case["n"], rank, world)
    cls = slice(start, start + n_local)
    x_loc = x[rows].clone().requires_grad_(True)
    w_loc = w[cls].clone().requires_grad_(True)
    b_loc = bias[cls].clone().requires_grad_(True) if bias is not None else None
    with counting_all_gathers() as gathers:
        loss = sharded_soft_cross_entropy(x_loc, w_loc, start, case["n"], a[rows], b[rows], lam[rows],
                                          smoothing=case["eps"], chunk_size=case["chunk"], bias_shard=b_loc,
                                          equal_batches=case["equal_batches"])
        loss.backward()
    out = {"loss": err(loss.detach(), ref[0]), "features": err(x_loc.grad, ref[1][rows]),
           "weight": err(w_loc.grad, ref[2][cls])}
    if bias is not None:
        out["bias"] = err(b_loc.grad, ref[3][cls])
    return out, gathers[0]


def module_case(rank: int, world: int, equal_batches: bool) -> dict:
    """ShardedLinear end to end: P-independent init via full_weight, and its loss."""
    n, seed = 1001, 5
    mod = ShardedLinear(n, D, rank=rank, world_size=world, seed=seed)
    full = mod.full_weight()
    single = ShardedLinear(n, D, seed=seed).weight.detach()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4 * world, D, generator=g)
    a, b = torch.randint(0, n, (4 * world,), generator=g), torch.randint(0, n, (4 * world,), generator=g)
    lam = torch.rand(4 * world, generator=g)
    rows = slice(4 * rank, 4 * rank + 4)
    loss = mod.loss(x[rows], a[rows], b[rows], lam[rows], smoothing=0.1, chunk_size=3, equal_batches=equal_batches)
    loss.backward()
    ref = dense_reference(x, single, None, a, b, lam, 0.1)
    return {"full_weight": err(full, single.double()), "loss": err(loss.detach(), ref[0]),
            "weight": err(mod.weight.grad, ref[2][mod.shard_start : mod.shard_start + mod.n_local])}


def bad_target_case(rank: int, world: int, equal_batches: bool) -> str:
    """The last rank passes target N: every rank must raise the same ValueError (none may be left
    waiting in a collective) and the group must stay usable. Returns each rank's message."""
    n = 10
    start, n_local = shard_range(n, rank, world)
    a = torch.tensor([1, n if rank == world - 1 else 2])
    try:
        sharded_soft_cross_entropy(torch.randn(2, D), torch.randn(n_local, D), start, n, a, a, torch.ones(2),
                                   equal_batches=equal_batches)
    except ValueError as e:
        return str(e)
    return "no error"


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for c in cases(world):
            errors, gathers = run_case(c, rank, world)
            results[f"case{c['idx']}"] = {"case": dict(c), "err": errors, "all_gathers": gathers}
        results["module"] = {"case": {"n": 1001}, "err": module_case(rank, world, False)}
        results["module_declared"] = {"case": {"n": 1001}, "err": module_case(rank, world, True)}
        results["bad_target"] = bad_target_case(rank, world, False)
        results["bad_target_declared"] = bad_target_case(rank, world, True)
        Path(out_dir, f"rank_{rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # manual run: python _sharded_fc_worker.py RANK WORLD INIT_FILE OUT_DIR
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
