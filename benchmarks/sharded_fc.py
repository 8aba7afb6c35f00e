"""Peak memory and forward+backward time of the sharded N-way classifier vs one dense process.

For each N x D (``--sizes``), with the same global batch (``--batch``, CutMix targets + label
smoothing) and the same initial W:

  dense    one process holds W [N, D], its gradient and AdamW state and computes the full
           [B, N] logits: ``log_softmax(x @ W.T)`` with the soft target gathered sparsely
           (the usual single-device implementation; no [B, N] target tensor).
  sharded  P (``--world``, default 2) gloo processes, each with ShardedLinear's [N/P, D] shard
           and its AdamW state; ``sharded_soft_cross_entropy`` with ``--chunk`` logit rows.

Measured per process (after ``--warmup`` steps, over ``--reps`` steps; one step = forward +
backward, then AdamW step, timed separately):
  peak MB   RSS high-water mark minus the RSS just before the classifier is built (Linux: VmHWM,
            reset through /proc/self/clear_refs; glibc is told to mmap every buffer >= 64 KiB
            so freed memory is returned and configurations do not inherit each other's heap).
            A small untimed configuration runs first in every process, so library code pages and
            lazy initialisation (which VmHWM would also count) are paid before the first measurement.
            This is the OS's view of everything the classifier step touched (weights, grads,
            AdamW state and its temporaries, logits, gathered features), not an allocator count.
  analytic  bytes of the tensors that must coexist: 16 B per weight element (W, grad, exp_avg,
            exp_avg_sq) + logits (dense: 3 x B x N fp32 - logits, saved log-probs, their grad;
            sharded: C x N/P) + features.
  fwd+bwd   median seconds, wall clock and CPU (``time.process_time``: all threads of the
            process, gloo's included); for the sharded run the slowest rank's. Every process runs
            ``--threads`` intra-op threads (default 1), so P ranks on P cores compare with one
            dense process on one core: the ideal per-rank time is dense / P. On a shared machine
            wall time mostly measures the other users' load; CPU seconds do not.

Then it prints ratios against the issue's targets (per-rank memory <= 1.05 x dense / P + chunk
buffer; per-rank time <= 1.2 x dense / P at N = 1,281,167) and projects per-rank memory at
P = 8, 16, 64 from the measured bytes per weight element. On a GPU the same script would need
``torch.cuda.max_memory_allocated``; this version measures CPU processes only.

    python benchmarks/sharded_fc.py [--sizes 10000x192,100000x768,1281167x192] [--batch 256]
        [--chunk 64] [--world 2] [--reps 2] [--warmup 1] [--threads 1] [--json OUT]

``--p1`` instead compares, in one process (P = 1) and without the optimizer, our loss with the
other ways to compute a big-N cross-entropy (``P1_KINDS``), per N x D: forward+backward median
seconds (wall, CPU) and the step's RSS high-water above W and the inputs (W's gradient,
logits, chunk buffers), plus each loss minus the dense one. Hard labels without smoothing,
because that is the only case torch's chunked ``linear_cross_entropy`` runs (with label
smoothing it silently falls back to the dense reference path); ``ours_cutmix`` and
``torch_soft`` show what soft (CutMix + smoothing) targets cost each.

    python benchmarks/sharded_fc.py --p1 --sizes 1281167x192,1281167x768 [--batch 256] [--chunk 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dist_ssl.parallel.sharded_fc import ShardedLinear
from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

DEFAULT_SIZES = "10000x192,10000x768,100000x192,100000x768,1281167x192"
IMAGENET = 1_281_167
MB = 2**20


# ----------------------------------------------------------------------------- measuring
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def global_batch(m: int, n: int, d: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g)
    a = torch.randint(0, n, (m,), generator=g)
    b = torch.randint(0, n, (m,), generator=g)
    lam = torch.rand(m, generator=g)
    return x, a, b, lam


def dense_loss(x, w, a, b, lam, eps):
    logp = (x @ w.t()).log_softmax(1)
    target = lam * logp.gather(1, a[:, None]).squeeze(1) + (1 - lam) * logp.gather(1, b[:, None]).squeeze(1)
    return -((1 - eps) * target + eps / w.shape[0] * logp.sum(1)).mean()


def measure(rank: int, world: int, n: int, d: int, args) -> dict:
    """One configuration in this process: peak RSS delta, step times, first loss."""
    sharded = world > 1
    x, a, b, lam = global_batch(args.batch, n, d)
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    gc.collect()
    base_kb = _status_kb("VmRSS")
    _reset_peak_rss()
    fc = ShardedLinear(n, d, rank=rank, world_size=world, seed=0)
    opt = torch.optim.AdamW(fc.parameters(), lr=1e-3, weight_decay=1e-3)
    fwd_bwd, cpu, opt_s, first_loss = [], [], [], None
    for i in range(args.warmup + args.reps):
        feats = x[rows].clone().requires_grad_(True)
        if sharded:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if sharded:
            loss = fc.loss(feats, a[rows], b[rows], lam[rows], smoothing=args.smoothing, chunk_size=args.chunk)
        else:
            loss = dense_loss(feats, fc.weight, a, b, lam, args.smoothing)
        loss.backward()
        t1, c1 = time.perf_counter(), time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        first_loss = loss.item() if first_loss is None else first_loss
        if i >= args.warmup:
            fwd_bwd.append(t1 - t0)
            cpu.append(c1 - c0)
            opt_s.append(t2 - t1)
    peak = (_status_kb("VmHWM") - base_kb) * 1024
    n_local, m = fc.n_local, args.batch
    logits = (min(args.chunk or m, m) * n_local * 4) if sharded else 3 * m * n * 4
    feats_bytes = 2 * m * d * 4  # (gathered) features and their gradient
    del fc, opt, loss, feats
    gc.collect()
    return {"n": n, "d": d, "n_local": n_local, "peak_bytes": peak, "logit_bytes": logits,
            "analytic_bytes": 16 * n_local * d + logits + feats_bytes,
            "fwd_bwd_s": statistics.median(fwd_bwd), "cpu_s": statistics.median(cpu),
            "opt_s": statistics.median(opt_s), "loss": first_loss}


def worker(rank: int, world: int, sizes: list[tuple[int, int]], args, init_file: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=1800))
    n0, d0 = sizes[0]
    measure(rank, world, min(n0, 4096), d0, args)  # untimed: pages in library code, lazy inits, gloo buffers
    results = []
    for n, d in sizes:
        res = measure(rank, world, n, d, args)
        if world > 1:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, res)
            res = dict(per_rank[0], peak_bytes=max(r["peak_bytes"] for r in per_rank),
                       fwd_bwd_s=max(r["fwd_bwd_s"] for r in per_rank), cpu_s=max(r["cpu_s"] for r in per_rank),
                       opt_s=max(r["opt_s"] for r in per_rank),
                       n_local=max(r["n_local"] for r in per_rank),
                       analytic_bytes=max(r["analytic_bytes"] for r in per_rank),
                       logit_bytes=max(r["logit_bytes"] for r in per_rank))
        if rank == 0:
            results.append(res)
            print(f"  {'P=%d' % world if world > 1 else 'dense'} N={n} D={d}: peak {res['peak_bytes'] / MB:.0f} MB, "
                  f"fwd+bwd {res['fwd_bwd_s']:.3f} s wall, {res['cpu_s']:.3f} s CPU", flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, sizes, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(worker, args=(world, sizes, args, os.path.join(tmp, "init"), out), nprocs=world,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------- P = 1 comparison
P1_KINDS = {  # name -> what it is (hard labels, no smoothing, unless it says otherwise)
    "dense": "log_softmax(x @ W.T): [B, N] logits, their log-probs and gradient",
    "torch_auto": "F.linear_cross_entropy, chunked, default LinearCrossEntropyOptions()",
    "torch_c64": "F.linear_cross_entropy, chunked, batch_chunk_size = --chunk",
    "torch_1chunk": "F.linear_cross_entropy, chunked, batch_chunk_size = B (one chunk)",
    "torch_soft": "F.linear_cross_entropy, one chunk, CutMix + smoothing 0.1 as a dense [B, N] target",
    "ours": "sharded_soft_cross_entropy, one logit block (chunk_size None)",
    "ours_c64": "sharded_soft_cross_entropy, class blocks of --chunk rows (recomputed in backward)",
    "ours_cutmix": "sharded_soft_cross_entropy, one block, CutMix + smoothing 0.1 (sparse targets)",
    "cce_compile": "cut_cross_entropy impl=torch_compile (its CPU path: a compiled dense loss)",
}


def _p1_loss(kind: str, x, w, a, b, lam, chunk: int):
    from torch.nn import LinearCrossEntropyOptions

    m, n = x.shape[0], w.shape[0]
    ones = torch.ones(m)
    if kind == "dense":
        return F.cross_entropy(x @ w.t(), a)
    if kind.startswith("torch_"):
        rows = {"torch_c64": chunk, "torch_1chunk": m, "torch_soft": m}.get(kind)
        opts = LinearCrossEntropyOptions() if rows is None else \
            LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None)
        target = a
        if kind == "torch_soft":  # the only way torch's loss takes a mixed target: dense [B, N]
            target = torch.full((m, n), 0.1 / n)
            target[torch.arange(m), a] += 0.9 * lam
            target[torch.arange(m), b] += 0.9 * (1 - lam)
        return F.linear_cross_entropy(x, w, target, options=opts)
    if kind == "cce_compile":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(x, w, a, impl="torch_compile")
    chunk_size = chunk if kind == "ours_c64" else None
    if kind == "ours_cutmix":
        return sharded_soft_cross_entropy(x, w, 0, n, a, b, lam, 0.1, chunk_size=chunk_size)
    return sharded_soft_cross_entropy(x, w, 0, n, a, a, ones, 0.0, chunk_size=chunk_size)


def measure_p1(kind: str, n: int, d: int, args) -> dict:
    x, a, b, lam = global_batch(args.batch, n, d)
    w = ShardedLinear(n, d, seed=0).weight.detach().requires_grad_(True)
    gc.collect()
    base_kb = _status_kb("VmRSS")  # W and the inputs exist: the delta is the loss step's own memory
    _reset_peak_rss()
    wall, cpu, loss_value = [], [], None
    for i in range(args.warmup + args.reps):
        feats = x.clone().requires_grad_(True)
        w.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = _p1_loss(kind, feats, w, a, b, lam, args.chunk or args.batch)
        loss.backward()
        t1, c1 = time.perf_counter(), time.process_time()
        loss_value = loss.item()
        if i >= args.warmup:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
        del loss, feats
    peak = (_status_kb("VmHWM") - base_kb) * 1024
    del w
    gc.collect()
    return {"kind": kind, "n": n, "d": d, "step_bytes": peak, "wall_s": statistics.median(wall),
            "cpu_s": statistics.median(cpu), "loss": loss_value}


def worker_p1(rank: int, kinds: list[str], size: tuple[int, int], args, out: str) -> None:
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*linear_cross_entropy.*")
    results = []
    for kind in kinds:
        measure_p1(kind, 4096, size[1], args)  # untimed: library pages, lazy inits, compiles at this N
        res = measure_p1(kind, *size, args)
        print(f"  {kind:>12} N={size[0]} D={size[1]}: {res['step_bytes'] / MB:7.0f} MB, {res['wall_s']:7.2f} s wall, "
              f"{res['cpu_s']:7.2f} s CPU, loss {res['loss']:.6f}", flush=True)
        results.append(res)
    Path(out).write_text(json.dumps(results))


def run_p1(sizes, args) -> list[dict]:
    kinds = [k for k in args.p1_kinds.split(",") if k != "cce_compile" or _have("cut_cross_entropy")]
    unknown = sorted(set(kinds) - set(P1_KINDS))
    if unknown:
        raise SystemExit(f"--p1-kinds: unknown {unknown}; choose from {', '.join(P1_KINDS)}")
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            mp.start_processes(worker_p1, args=(kinds, size, args, out), nprocs=1, start_method="spawn")
            rows += json.loads(Path(out).read_text())
    return rows


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def report_p1(rows: list[dict], args) -> None:
    print(f"\nP = 1, global batch {args.batch}, {args.threads} thread(s); step MB = RSS high-water above W and "
          "the inputs during forward+backward (W's gradient included); s = median forward+backward seconds; "
          "loss - dense: hard-label kinds compute the same loss")
    head = (f"{'N':>9} {'D':>4} {'kind':>12} | {'step MB':>8} {'wall s':>7} {'cpu s':>7} | "
            f"{'cpu/ours':>8} {'MB/ours':>8} | {'loss - dense':>12}")
    print(head + "\n" + "-" * len(head))
    for (n, d) in dict.fromkeys((r["n"], r["d"]) for r in rows):
        group = {r["kind"]: r for r in rows if (r["n"], r["d"]) == (n, d)}
        if "ours" not in group or "dense" not in group:
            for r in group.values():
                print(f"{n:>9} {d:>4} {r['kind']:>12} | {r['step_bytes'] / MB:>8.0f} {r['wall_s']:>7.2f} "
                      f"{r['cpu_s']:>7.2f} | (ratios need the ours and dense kinds)")
            continue
        ours, dense = group["ours"], group["dense"]
        for kind, r in group.items():
            diff = "" if kind in ("ours_cutmix", "torch_soft") else f"{r['loss'] - dense['loss']:+.1e}"
            print(f"{n:>9} {d:>4} {kind:>12} | {r['step_bytes'] / MB:>8.0f} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} | "
                  f"{r['cpu_s'] / ours['cpu_s']:>8.2f} {r['step_bytes'] / max(ours['step_bytes'], 1):>8.2f} | {diff:>12}")
        torch_hard = [group[k] for k in group if k.startswith("torch_") and k != "torch_soft"]
        if not torch_hard:
            continue
        best = min(torch_hard, key=lambda r: r["cpu_s"])
        print(f"  target at N={n}, D={d}: ours vs torch's best hard-label chunking ({best['kind']}): "
              f"{ours['cpu_s'] / best['cpu_s']:.2f}x its CPU time (<= 1 is met), "
              f"{ours['step_bytes'] / max(best['step_bytes'], 1):.2f}x its memory (<= 1 is met)")


# ----------------------------------------------------------------------------- reporting
def report(dense: list[dict], shard: list[dict], args) -> dict:
    p = args.world
    print(f"\nglobal batch {args.batch}, chunk {args.chunk}, P={p} gloo processes x {args.threads} thread(s) "
          f"vs 1 dense process x {args.threads} thread(s); MB = 2^20 B of RSS high-water delta; s = median "
          "forward+backward seconds, wall and CPU (process_time, all threads of the process)")
    head = (f"{'N':>9} {'D':>4} | {'dense MB':>8} {'wall s':>7} {'cpu s':>7} | {'rank MB':>7} {'analyt':>6} "
            f"{'wall s':>7} {'cpu s':>7} | {'mem/(dense/P)':>13} {'mem/(dense/P+chunk)':>19} "
            f"{'wall/(dense/P)':>14} {'cpu/(dense/P)':>13} {'loss diff':>9}")
    print(head + "\n" + "-" * len(head))
    rows = []
    for dn, sh in zip(dense, shard):
        ideal_mem = dn["peak_bytes"] / p
        row = dict(n=dn["n"], d=dn["d"], dense_mb=dn["peak_bytes"] / MB, dense_s=dn["fwd_bwd_s"],
                   dense_cpu_s=dn["cpu_s"],
                   rank_mb=sh["peak_bytes"] / MB, rank_analytic_mb=sh["analytic_bytes"] / MB, rank_s=sh["fwd_bwd_s"],
                   rank_cpu_s=sh["cpu_s"], mem_ratio=sh["peak_bytes"] / ideal_mem,
                   mem_ratio_with_chunk=sh["peak_bytes"] / (ideal_mem + sh["logit_bytes"]),
                   time_ratio=sh["fwd_bwd_s"] / (dn["fwd_bwd_s"] / p), cpu_ratio=sh["cpu_s"] / (dn["cpu_s"] / p),
                   loss_diff=abs(dn["loss"] - sh["loss"]), dense_opt_s=dn["opt_s"], rank_opt_s=sh["opt_s"])
        rows.append(row)
        print(f"{row['n']:>9} {row['d']:>4} | {row['dense_mb']:>8.0f} {row['dense_s']:>7.2f} "
              f"{row['dense_cpu_s']:>7.2f} | {row['rank_mb']:>7.0f} {row['rank_analytic_mb']:>6.0f} "
              f"{row['rank_s']:>7.2f} {row['rank_cpu_s']:>7.2f} | "
              f"{row['mem_ratio']:>13.2f} {row['mem_ratio_with_chunk']:>19.2f} {row['time_ratio']:>14.2f} "
              f"{row['cpu_ratio']:>13.2f} {row['loss_diff']:>9.1e}")
    big = [r for r in rows if r["n"] == IMAGENET]
    verdict = (lambda ok: "MET" if ok else "NOT met")
    for r in big:
        print(f"targets at N={IMAGENET}, D={r['d']}: memory {verdict(r['mem_ratio_with_chunk'] <= 1.05)} "
              f"({r['mem_ratio_with_chunk']:.2f} of dense/P + chunk, limit 1.05); time (limit 1.2 x dense/P) "
              f"{verdict(r['cpu_ratio'] <= 1.2)} in CPU seconds ({r['cpu_ratio']:.2f}), "
              f"{verdict(r['time_ratio'] <= 1.2)} in wall seconds ({r['time_ratio']:.2f})")
    if not big:
        print(f"(N={IMAGENET} not measured: the targets apply there)")
    return {"rows": rows, "projection": project(shard, args)}


def project(shard: list[dict], args) -> list[dict]:
    """Per-rank MB at larger P from the measured bytes per weight element (largest config per D)."""
    per_elem = {}
    for r in sorted(shard, key=lambda r: r["n_local"] * r["d"]):
        rest = r["logit_bytes"] + 2 * args.batch * r["d"] * 4
        per_elem[r["d"]] = max(r["peak_bytes"] - rest, 0) / (r["n_local"] * r["d"])
    print(f"\nprojected per-rank memory at N={IMAGENET} (global batch {args.batch}, chunk {args.chunk}): "
          "measured B/weight element x N/P x D + chunk logits + gathered features")
    out = []
    for d in sorted({192, 768} | set(per_elem)):
        nearest = min(per_elem, key=lambda k: abs(k - d))
        cost = per_elem[nearest]
        cells = []
        for p in args.project:
            n_local = -(-IMAGENET // p)
            mb = (cost * n_local * d + min(args.chunk or args.batch, args.batch) * n_local * 4
                  + 2 * args.batch * d * 4) / MB
            cells.append(f"P={p}: {mb:>7.0f} MB")
            out.append({"d": d, "p": p, "mb": mb, "bytes_per_elem": cost})
        print(f"  D={d:>4} ({cost:.1f} B/elem{'' if d in per_elem else f', cost from D={nearest}'}): "
              + "  ".join(cells))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxD")
    ap.add_argument("--batch", type=int, default=256, help="global batch (split evenly over ranks)")
    ap.add_argument("--chunk", type=int, default=64, help="logit rows per chunk (0 = whole global batch)")
    ap.add_argument("--world", type=int, default=2, help="sharded processes P")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--project", default="8,16,64", help="P values for the projection table")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--p1", action="store_true", help="P = 1 comparison with torch's / CCE's / the dense loss")
    ap.add_argument("--p1-kinds", default=",".join(P1_KINDS), help="comma-separated subset of P1_KINDS")
    args = ap.parse_args(argv)
    args.project = [int(p) for p in args.project.split(",")]
    args.chunk = args.chunk or None
    sizes = sorted((tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")),
                   key=lambda s: s[0] * s[1])
    if args.batch % args.world:
        ap.error("--batch must be divisible by --world")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the workers: big frees go back to the OS
    t0 = time.perf_counter()
    if args.p1:
        print(f"P = 1 comparison: {len(sizes)} sizes x {len(args.p1_kinds.split(','))} kinds", flush=True)
        rows = run_p1(sizes, args)
        report_p1(rows, args)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                             "p1": rows}, indent=1, default=str))
        return 0
    print(f"dense, 1 process: {len(sizes)} configurations", flush=True)
    dense = run(1, sizes, args)
    print(f"sharded, {args.world} gloo processes", flush=True)
    shard = run(args.world, sizes, args)
    result = report(dense, shard, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, **result},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
