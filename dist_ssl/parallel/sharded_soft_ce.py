"""Sparse soft-target cross-entropy of an exact N-way linear classifier sharded over ranks.

IDMM (Cao, Yu & Wu, "Training Vision Transformers with Only 2040 Images", ECCV 2022) trains one
class per training image: W is [N, D] with N up to 1,281,167 (ImageNet), too big for one device
with its gradient and AdamW state (16*N*D bytes) and its B x N logits. Each of P ranks owns a
contiguous class range (``sharded_fc.shard_range``); features of the global batch are
all-gathered with autograd (``sharded_fc_gather``), every rank computes logits of the global batch
for its own classes only, in class blocks (``sharded_fc_blocks``), and the softmax normaliser
comes from all-reduces of per-row statistics, so the loss is exact.

Shape legend: B = this rank's rows, M = rows of all ranks (global batch, rank order), D = feature
dim, N = number of classes (global), n_local = classes of this rank, C = logit chunk rows.

Loss (soft target as timm's mixup target, passed sparsely, never as an M x N tensor):
    q_i = (1-eps) * (lam_i * onehot(a_i) + (1-lam_i) * onehot(b_i)) + eps/N
    L   = mean_i  -sum_j q_ij log p_ij  =  mean_i [ lse_i - (1-eps)(lam_i z_ia + (1-lam_i) z_ib)
                                                     - eps/N * sum_j z_ij ]
The last sum runs over all N classes (a local sum, all-reduced). Megatron's vocab-parallel CE
uses the local class count and a local mean there, which is wrong under sharding; PyTorch's
loss_parallel does not take soft targets.

Gradient convention: the result is one scalar L, the same on every rank; ``weight_shard.grad``
gets dL/dW[my rows] and ``features.grad`` gets dL/dx[my rows] (partial feature gradients of all
ranks are summed back to the producing rank by a reduce-scatter). A data-parallel wrapper that
*averages* backbone gradients over P ranks then yields dL/dtheta / P for the backbone; use
``grad_scale(features, P)`` (``sharded_fc_gather``) before the loss to undo that without touching
the shard's gradient.

Memory: the global-batch logits [M, n_local] are processed in class blocks of at most C x n_local
elements (the memory of C logit rows) in one reused buffer; forward keeps only per-row statistics
(O(M), an online log-sum-exp over the blocks) and backward recomputes each block's logits (one
extra matmul: ~4/3 of a dense layer's FLOPs). With chunk_size=None or >= M (one block) the buffer
[M, n_local] is kept from forward to backward instead and nothing is recomputed. The buffer is in
the compute dtype (bf16 halves it). Besides it: the gathered features and their gradient (M x D)
and the weight gradient.

Precision: features, weight blocks, matmuls and logits are in the compute dtype: the weight's, or
bf16 for fp32 (master) weights under a bf16 autocast (``parallel.mixed_precision: bf16``), or
``compute_dtype``; never fp16 (p ~ 1/N would be subnormal). Autocast itself is off inside. In
fp32 regardless: the row max, the running sum of exp, the eps/N sum of all logits, the target
logits, the cross-rank statistics, the exp itself (bf16 logits are lifted to fp32 a few rows at
a time, so p is rounded once, or twice when one block keeps exp(z - max) from forward) and dL/dx
summed over blocks; gradients of fp32 weights are fp32.
bf16 error against the float64 dense loss of the same bf16-rounded x and W, measured at
N = 1,281,167, D = 192, M = 64, CutMix + eps 0.1, one block and 16-row blocks
(``python benchmarks/sharded_fc_bf16_error.py``; benchmarks/README.md has the table):
  loss                       relative 2.8e-6 (W at IDMM's init, logit std 0.28), 2.0e-5 (logit std 2.8)
  dL/dx, dL/dW               relative error norm <= 2.9e-3 (the bf16 rounding of the values)
  dL/dW, non-target rows     3.3e-3 at init, 1.9e-2 at logit std 2.8: a bf16 logit z carries
                             ~2^-9 |z| into exp(z - lse), as autocast's Linear + fp32 cross-entropy
Bound held by tests/unit/test_sharded_fc.py (N = 20,000, D = 64): loss 2e-4 relative, gradients
8e-3, non-target rows 8e-3 at init and 4e-2 at logit std 2.4. fp32 compute: <= 1.5e-6 everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dist_ssl.parallel.sharded_fc_blocks import (
    block_logits,
    block_width,
    exp_rows_,
    fast_right_operand,
    in_block,
    resolve_compute_dtype,
    scale_rows_,
)
from dist_ssl.parallel.sharded_fc_gather import check_targets, gather_batch, group_rank_size


class _ShardedSoftCE(torch.autograd.Function):
    """Loss of the gathered rows x [M, D] against this rank's classes; see the module doc.

    The logits [M, n_local] are computed in class blocks of all M rows, each at most ``chunk`` x
    n_local elements (the memory of ``chunk`` full rows). With one block (chunk >= M) the
    forward's exp(z - rowmax) buffer is kept for backward (3 matmuls per step, like a dense
    layer). With several blocks forward keeps only O(M) statistics (an online log-sum-exp over
    the blocks) and backward recomputes each block's logits (4 matmuls). Blocking over classes,
    not rows, writes each block's weight gradient once instead of accumulating the whole
    [n_local, D] gradient once per row chunk (memory traffic that made row chunks ~1.8x slower
    than one chunk at D = 768; benchmarks/sharded_fc.py).
    """

    @staticmethod
    def forward(ctx, x, w, b, a, bb, lam, start: int, num_classes: int, eps: float, chunk: int, group):
        # x is in the compute dtype (logits too); w / b may be wider (fp32 master weights)
        stat = torch.promote_types(x.dtype, torch.float32)
        m_rows, n_local = x.shape[0], w.shape[0]
        la, lb = a - start, bb - start
        in_a, in_b = (la >= 0) & (la < n_local), (lb >= 0) & (lb < n_local)
        lam = lam.to(stat)
        rmax = torch.full((m_rows,), -math.inf, dtype=stat, device=x.device)  # running row max
        rsum = torch.zeros(m_rows, dtype=stat, device=x.device)  # running sum of exp(z - rmax)
        za, zb, zsum = (torch.zeros(m_rows, dtype=stat, device=x.device) for _ in range(3))
        width = block_width(chunk, m_rows, n_local)
        flat = x.new_empty(m_rows * width)  # the one block-sized buffer, in the compute dtype
        ctx.cache = None
        for c0 in range(0, n_local, width):
            c1 = min(n_local, c0 + width)
            z = block_logits(x, w[c0:c1], None if b is None else b[c0:c1], flat[: m_rows * (c1 - c0)])
            for ids, hit, out in ((la, in_a, za), (lb, in_b, zb)):
                inb, col = in_block(ids, hit, c0, c1)  # each target lies in one block: += is a set
                out += torch.where(inb, z.gather(1, col[:, None]).squeeze(1), 0.0)
            if eps:  # the eps/N term (a full pass over the logits): summed in >= fp32
                zsum += z.sum(1, dtype=stat)
            new_max = torch.maximum(rmax, z.amax(1).to(stat))
            rsum.mul_((rmax - new_max).exp_()).add_(exp_rows_(z, new_max, want_sum=True))
            rmax = new_max
            if c1 - c0 == n_local:
                ctx.cache = (z, rmax)  # exp(z - rmax): p = this * exp(rmax - lse) in backward
        lse_loc = rmax + rsum.log()  # -inf on a rank without classes
        tgt_loc = (1 - eps) * (lam * za + (1 - lam) * zb) + (eps / num_classes) * zsum
        lse, tgt = _global_stats(lse_loc, tgt_loc, group)
        ctx.save_for_backward(x, w, b, lse, la, lb, in_a, in_b, lam)
        ctx.cfg = (num_classes, eps, width)
        return (lse - tgt).mean()

    @staticmethod
    def backward(ctx, g):
        x, w, b, lse, la, lb, in_a, in_b, lam = ctx.saved_tensors
        num_classes, eps, width = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        m_rows, n_local = x.shape[0], w.shape[0]
        gx = torch.zeros_like(x, dtype=lse.dtype) if need_x else None  # summed over blocks: >= fp32
        gw = torch.empty_like(w) if need_w else None  # every block writes its rows once
        gb = torch.empty_like(b) if need_b else None
        scale = g.to(lse.dtype) / m_rows  # dL/dz = scale * (p - q); applied to the small factors
        xs = (x * scale).to(x.dtype) if need_w else None
        cache, ctx.cache = ctx.cache, None  # a second backward (retain_graph) recomputes
        flat = None
        with torch.autocast(x.device.type, enabled=False):
            for c0 in range(0, n_local, width):
                c1 = min(n_local, c0 + width)
                wc = w[c0:c1].to(x.dtype)  # the compute-dtype block (a copy only for wider master weights)
                if cache is not None:  # one block: finish the forward's buffer in place
                    gz = scale_rows_(cache[0], (cache[1] - lse).exp_(), minus=eps / num_classes)
                else:
                    flat = x.new_empty(m_rows * width) if flat is None else flat
                    gz = block_logits(x, wc, None if b is None else b[c0:c1], flat[: m_rows * (c1 - c0)])
                    exp_rows_(gz, lse, minus=eps / num_classes)
                _subtract_targets_(gz, ((la, in_a, lam), (lb, in_b, 1 - lam)), eps, c0, c1)  # p - q
                if need_w and gw.dtype == gz.dtype:
                    torch.mm(gz.t(), xs, out=gw[c0:c1])
                elif need_w:
                    gw[c0:c1] = gz.t() @ xs
                if need_x and gx.dtype == gz.dtype:
                    gx.addmm_(gz, wc)
                elif need_x:
                    gx += gz @ fast_right_operand(wc)  # each block's partial rounded once, summed in fp32
                if need_b:
                    gb[c0:c1] = gz.sum(0, dtype=lse.dtype) * scale
        if need_x:
            gx = gx.mul_(scale).to(x.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None, None



def _subtract_targets_(gz: torch.Tensor, targets, eps: float, c0: int, c1: int) -> None:
    """In place, the target part of p - q in the class block [c0, c1): gz[i, t_i] -= (1 - eps) * w_i
    for each (local ids t, on-this-rank mask, row weights w = lam or 1 - lam) of ``targets`` (the
    eps/N part is already in gz). Added in >= fp32 and rounded once; a == b hits one column twice."""
    for ids, hit, row_w in targets:
        inb, col = in_block(ids, hit, c0, c1)
        at = gz.gather(1, col[:, None]).squeeze(1)
        gz.scatter_(1, col[:, None], torch.where(inb, at + (eps - 1) * row_w, at).to(gz.dtype)[:, None])


def _global_stats(lse_loc: torch.Tensor, tgt_loc: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp over all N classes and the summed target term [M] (two small
    all-reduces per call, independent of the chunk count)."""
    world = group_rank_size(group)[1]
    gmax = lse_loc.clone()
    if world > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    parts = torch.stack([(lse_loc - gmax).exp(), tgt_loc], 1)
    if world > 1:
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)
    return gmax + parts[:, 0].log(), parts[:, 1]


def sharded_soft_cross_entropy(features, weight_shard, shard_start, num_classes, target_a, target_b, lam,
                               smoothing=0.0, group=None, chunk_size=None, bias_shard=None,
                               compute_dtype=None, equal_batches=False) -> torch.Tensor:
    """Mean over the global batch of -sum_j q_j log softmax(x W^T + bias)_j; the same on every rank.

    features [B, D]: this rank's rows. B may differ between ranks (eval, a last short batch): then
    one extra tiny all-gather of the sizes and a host sync. ``equal_batches=True`` is the caller's
    guarantee that every rank passes the same B (training batches: the train loader gives every
    rank full batches of ``train.batch_size``, ``MethodContext.equal_rank_batches``): no size
    gather, no host sync on a GPU (a false promise is a bug: the feature gather then fails or, on
    NCCL, may hang). weight_shard [n_local, D], bias_shard [n_local] or None: classes
    [shard_start, shard_start + n_local) of ``num_classes`` (N, global). target_a, target_b [B]
    (long, in [0, N); any rank's target outside it raises ValueError on every rank) and lam [B]
    (1.0 = no mixing; a == b is allowed) of this rank's rows;
    ``smoothing`` = eps. ``chunk_size``: logit memory in rows, C x n_local elements per block (None = the whole global batch).
    ``group``: process group of the shards (None = default group; without an initialised group
    this is the exact single-process loss and the shard must be all N classes). Every rank of
    the group must call it (collectives in forward and backward). ``compute_dtype``: dtype of
    the gathered features, the matmuls and the logits (None = bf16 under a bf16 autocast with
    fp32 weights, else the weight's dtype; see "Precision" in the module doc). Returns a 0-d tensor.
    """
    rank, world = group_rank_size(group)
    _check_arguments(features, weight_shard, shard_start, num_classes, (target_a, target_b, lam), smoothing,
                     chunk_size, world)
    x = features.to(resolve_compute_dtype(compute_dtype, weight_shard, features.device))
    # one [B, 3] float64 gather for the targets (ids < 2**53 are exact in float64)
    tgt = torch.stack([t.to(x.device, torch.float64) for t in (target_a, target_b, lam)], 1)
    if world == 1:
        check_targets(target_a, target_b, num_classes)
    else:
        x, tgt = gather_batch(x, tgt, num_classes, rank, world, group, equal_batches)
    a, bb = tgt[:, 0].long(), tgt[:, 1].long()
    chunk = x.shape[0] if chunk_size is None else min(int(chunk_size), max(x.shape[0], 1))
    with torch.autocast(x.device.type, enabled=False):
        return _ShardedSoftCE.apply(x, weight_shard, bias_shard, a, bb, tgt[:, 2], int(shard_start),
                                    int(num_classes), float(smoothing), max(chunk, 1), group)


def _check_arguments(features, weight_shard, shard_start, num_classes, targets, smoothing, chunk_size,
                     world) -> None:
    """ValueError for a shard outside [0, N) (or not all of it at world size 1), smoothing outside
    [0, 1), chunk_size < 1, or targets (target_a, target_b, lam) that are not [B]."""
    n_local = weight_shard.shape[0]
    if not 0 <= shard_start <= shard_start + n_local <= num_classes:
        raise ValueError(f"shard [{shard_start}, {shard_start + n_local}) is not inside [0, {num_classes})")
    if world == 1 and (shard_start, n_local) != (0, num_classes):
        raise ValueError(f"world size 1 but the shard holds classes [{shard_start}, {shard_start + n_local}) "
                         f"of {num_classes}: a single process needs the whole weight")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    b_rows = features.shape[0]
    target_a, target_b, lam = targets
    if not (target_a.shape == target_b.shape == lam.shape == (b_rows,)):
        raise ValueError(f"target_a/target_b/lam must be [{b_rows}], got {tuple(target_a.shape)}, "
                         f"{tuple(target_b.shape)}, {tuple(lam.shape)}")
