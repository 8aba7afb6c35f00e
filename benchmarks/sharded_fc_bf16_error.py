"""Error of the sharded classifier's loss and gradients in bf16 against a float64 dense reference.

One process (P = 1: the same code runs per rank under sharding, and the cross-rank statistics are
fp32 all-reduces), N classes x D, M rows with CutMix targets and label smoothing 0.1:

  ours bf16  ``sharded_soft_cross_entropy`` with fp32 master weights and ``compute_dtype=bf16``
             (what a ``mixed_precision: bf16`` run does): bf16 features, weight blocks, matmuls
             and logits; max, sum-exp, the eps/N sum and the per-row statistics in fp32.
  ours fp32  the same in fp32, for scale.
  reference  the dense loss -sum_j q_ij log softmax(x W^T)_ij and its gradients in float64,
             computed on (a) the bf16-rounded x and W ("compute" error: what the kernel adds)
             and (b) the fp32 x and W ("total" error: bf16 inputs included).

For each chunk size (one block = all M rows kept; 16 = class blocks with recompute) and each
weight scale (0.02 = IDMM's init, logits ~0.3; 0.2 = logits ~3, like a trained classifier) it
prints |loss error| (absolute and relative) and for dL/dx, dL/dW and the non-target rows of
dL/dW the relative error norm ||g - ref|| / ||ref|| and the max abs error over max |ref|.

    python benchmarks/sharded_fc_bf16_error.py [--n 1281167] [--d 192] [--m 64] [--chunks 0,16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

IMAGENET = 1_281_167


def make_case(n: int, d: int, m: int, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w = torch.randn(n, d, generator=g) * scale
    a = torch.randint(0, n, (m,), generator=g)
    b = torch.randint(0, n, (m,), generator=g)
    lam = torch.rand(m, generator=g)
    return x, w, a, b, lam


def dense_reference_f64(x, w, a, b, lam, eps: float, rows: int = 16):
    """Loss, dL/dx, dL/dW of the dense soft-target CE in float64, a few rows at a time (the
    [M, N] float64 logits would not fit); the same formula as the unit tests' reference."""
    x, w, lam = x.double(), w.double(), lam.double()
    m, n = x.shape[0], w.shape[0]
    loss, gx, gw = 0.0, torch.zeros_like(x), torch.zeros_like(w)
    for r0 in range(0, m, rows):
        sl = slice(r0, r0 + rows)
        z = x[sl] @ w.t()
        lse = torch.logsumexp(z, 1)
        ar = torch.arange(z.shape[0])
        tgt = (1 - eps) * (lam[sl] * z[ar, a[sl]] + (1 - lam[sl]) * z[ar, b[sl]]) + eps / n * z.sum(1)
        loss += (lse - tgt).sum().item()
        gz = z.sub_(lse[:, None]).exp_().sub_(eps / n)  # p - q, target terms below
        gz[ar, a[sl]] -= (1 - eps) * lam[sl]
        gz[ar, b[sl]] -= (1 - eps) * (1 - lam[sl])
        gz /= m
        gx[sl] = gz @ w
        gw.addmm_(gz.t(), x[sl])
        del z, gz
    return loss / m, gx, gw


def ours(x, w, a, b, lam, eps: float, chunk, dtype):
    xf = x.clone().requires_grad_(True)
    wf = w.clone().requires_grad_(True)  # fp32 master weight; compute in ``dtype``
    t0 = time.process_time()
    loss = sharded_soft_cross_entropy(xf, wf, 0, w.shape[0], a, b, lam, eps, chunk_size=chunk, compute_dtype=dtype)
    loss.backward()
    return loss.item(), xf.grad, wf.grad, time.process_time() - t0


def errors(got, ref, targets) -> dict:
    """Loss error; relative error norm and max error / max of dL/dx, dL/dW and dL/dW's rows of
    the non-target classes (p only: the part that pushes every other instance away, invisible
    in the norm of all of dL/dW, which the M target rows dominate)."""
    loss, gx, gw = got
    rloss, rgx, rgw = ref
    rest = torch.ones(gw.shape[0], dtype=torch.bool)
    rest[targets] = False
    out = {"loss_abs": abs(loss - rloss), "loss_rel": abs(loss - rloss) / abs(rloss)}
    for name, g, r in (("gx", gx, rgx), ("gw", gw, rgw), ("gw_rest", gw[rest], rgw[rest])):
        diff = g.double() - r
        out[f"{name}_rel_norm"] = (diff.norm() / r.norm()).item()
        out[f"{name}_max_over_max"] = (diff.abs().max() / r.abs().max()).item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=IMAGENET)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--m", type=int, default=64, help="rows (the global batch of one loss call)")
    ap.add_argument("--chunks", default="0,16", help="chunk sizes (0 = one block of all rows)")
    ap.add_argument("--scales", default="0.02,0.2", help="std of W (0.02 = IDMM init)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"N={args.n} D={args.d} M={args.m} eps={args.eps}; errors of ours vs the float64 dense reference "
          "(compute: reference on the bf16-rounded x, W; total: on the fp32 x, W)")
    head = (f"{'scale':>5} {'chunk':>5} {'dtype':>5} {'ref':>7} | {'loss abs':>9} {'loss rel':>9} | "
            f"{'dx relnorm':>10} {'dx max/max':>10} | {'dW relnorm':>10} {'dW max/max':>10} | "
            f"{'dWrest rel':>10} {'max/max':>8} | {'cpu s':>6}")
    print(head + "\n" + "-" * len(head))
    for scale in (float(s) for s in args.scales.split(",")):
        x, w, a, b, lam = make_case(args.n, args.d, args.m, scale)
        print(f"W std {scale}: logits x.w have std {scale * args.d ** 0.5:.2f}", flush=True)
        xb, wb = x.bfloat16().float(), w.bfloat16().float()
        refs = {"total": dense_reference_f64(x, w, a, b, lam, args.eps),
                "compute": dense_reference_f64(xb, wb, a, b, lam, args.eps)}
        for chunk in (int(c) or None for c in args.chunks.split(",")):
            for dtype in (torch.bfloat16, torch.float32):
                *got, cpu = ours(x, w, a, b, lam, args.eps, chunk, dtype)
                for ref_name, ref in refs.items():
                    if dtype == torch.float32 and ref_name == "compute":
                        continue  # fp32 sees the fp32 inputs: only "total" applies
                    e = errors(got, ref, torch.cat([a, b]))
                    name = "bf16" if dtype == torch.bfloat16 else "fp32"
                    rows.append({"scale": scale, "chunk": chunk or args.m, "dtype": name, "ref": ref_name,
                                 "loss": got[0], "cpu_s": cpu, **e})
                    print(f"{scale:>5} {chunk or args.m:>5} {name:>5} {ref_name:>7} | {e['loss_abs']:>9.2e} "
                          f"{e['loss_rel']:>9.2e} | {e['gx_rel_norm']:>10.2e} {e['gx_max_over_max']:>10.2e} | "
                          f"{e['gw_rel_norm']:>10.2e} {e['gw_max_over_max']:>10.2e} | "
                          f"{e['gw_rest_rel_norm']:>10.2e} {e['gw_rest_max_over_max']:>8.2e} | {cpu:>6.1f}", flush=True)
    worst = {k: max(r[k] for r in rows if r["dtype"] == "bf16" and r["ref"] == "compute")
             for k in ("loss_rel", "gx_rel_norm", "gw_rel_norm", "gw_rest_rel_norm", "gx_max_over_max",
                       "gw_max_over_max", "gw_rest_max_over_max")}
    print("worst bf16 compute error: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "worst_bf16_compute": worst}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
