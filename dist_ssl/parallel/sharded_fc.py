"""Exact N-way linear classifier sharded over ranks, with sparse soft-target cross-entropy.

IDMM (Cao, Yu & Wu, "Training Vision Transformers with Only 2040 Images", ECCV 2022) trains one
class per training image: W is [N, D] with N up to 1,281,167 (ImageNet), too big for one device
with its gradient and AdamW state (16*N*D bytes) and its B x N logits. Each of P ranks owns a
contiguous class range (``shard_range``); features of the global batch are all-gathered (with
autograd), every rank computes logits of the global batch for its own classes only, and the
softmax normaliser comes from all-reduces of per-row statistics, so the loss is exact.

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
``grad_scale(features, P)`` before the loss to undo that without touching the shard's gradient.

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

import hashlib
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_ssl.parallel.sharded_fc_ckpt import reshard_rows, reshard_state

__all__ = ["shard_range", "sharded_soft_cross_entropy", "reshard_rows", "grad_scale", "init_rows", "ShardedLinear"]

INIT_BLOCK_ROWS = 4096  # init RNG granularity: row i depends only on (seed, i // 4096), never on P or N
_LIFT_ELEMS = 1 << 20  # low-precision logits: at least this many elements lifted to fp32 at a time


# ----------------------------------------------------------------------------- layout
def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(shard_start, n_local) of ``rank``: contiguous ranges in rank order covering [0, N);
    sizes differ by at most 1 and the first N % P ranks get the extra class."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def _group_rank_size(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- gathers
def _gather_sizes(n: int, bad: torch.Tensor, device: torch.device, group, world: int) -> tuple[list[int], list[int]]:
    """(rows of every rank, ranks whose ``bad`` flag is set): one tiny all-gather and the one host sync
    that the row sizes need anyway, so the target check below rides on it for free."""
    size = torch.stack([torch.tensor(n, dtype=torch.long, device=device), bad.to(device, torch.long)])
    # on the data's device (NCCL needs GPU); one .tolist() of the stacked parts = one host sync, not P
    parts = torch.stack(_all_gather_equal(size, group, world)).tolist()
    return [int(p[0]) for p in parts], [r for r, p in enumerate(parts) if p[1]]


def _targets_out_of_range(target_a: torch.Tensor, target_b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0-d bool on the targets' device: any target outside [0, N). Two compares and a reduction per
    target vector, no host sync (an out-of-range id would otherwise just miss every class block and
    give a finite, wrong loss)."""
    return ((target_a < 0) | (target_a >= num_classes) | (target_b < 0) | (target_b >= num_classes)).any()


def _bad_targets_message(num_classes: int, ranks: Optional[list[int]] = None, example=None) -> str:
    where = f" on rank(s) {ranks}" if ranks is not None else ""
    seen = f" (e.g. {example})" if example is not None else ""
    return (f"sharded_soft_cross_entropy: a target{where} is outside [0, {num_classes}){seen}: instance/class "
            f"ids must index the N = {num_classes} classes (check the shards against their manifest)")


def _check_targets(target_a: torch.Tensor, target_b: torch.Tensor, num_classes: int,
                   rows_per_rank: Optional[int] = None) -> None:
    """Range check of targets every rank holds alike (its own at P = 1, the gathered global batch
    with ``rows_per_rank``), so every rank raises together (a rank raising alone would leave the
    others in a collective). On CPU a ValueError naming the ranks; on a GPU an async device assert
    instead of a host sync (a violation ends the process at the next sync, as a device-side assert
    must)."""
    bad = _targets_out_of_range(target_a, target_b, num_classes)
    if bad.device.type != "cpu":
        torch._assert_async(~bad, _bad_targets_message(num_classes))
    elif bool(bad):
        ids = torch.cat([target_a, target_b])
        out = (ids < 0) | (ids >= num_classes)
        if rows_per_rank is None:
            raise ValueError(_bad_targets_message(num_classes, example=int(ids[out][0])))
        rows = out.nonzero().flatten() % len(target_a)
        raise ValueError(_bad_targets_message(num_classes, ranks=sorted({int(r) // rows_per_rank for r in rows})))


def _all_gather_equal(t: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])


def _gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """[B, *] per rank (B may differ) -> [M, *] in rank order; no autograd."""
    parts = _all_gather_equal(_pad_rows(t, max(sizes)), group, len(sizes))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather of feature rows; backward sums every rank's partial gradient of this rank's
    rows (reduce-scatter): each rank's logits cover only its classes, so the full dL/dx is the
    sum of the ranks' partial products grad_z @ W_shard."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, n_max = ctx.sizes, max(ctx.sizes)
        pieces = [_pad_rows(g, n_max).contiguous() for g in grad.split(sizes)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, op=dist.ReduceOp.SUM, group=ctx.group)
        return out[: sizes[ctx.rank]], None, None, None


def _gather_batch(x: torch.Tensor, tgt: torch.Tensor, num_classes: int, rank: int, world: int, group,
                  equal_batches: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's features x [B, D] and targets tgt [B, 3] -> the global batch's [M, D], [M, 3],
    targets range-checked with every rank raising together. Equal batches: two gathers. Else a
    size gather first, whose host sync also carries every rank's range flag."""
    b_rows = x.shape[0]
    if equal_batches:
        sizes = [b_rows] * world
    else:
        bad = _targets_out_of_range(tgt[:, 0], tgt[:, 1], num_classes)
        sizes, bad_ranks = _gather_sizes(b_rows, bad, x.device, group, world)
        if bad_ranks:
            raise ValueError(_bad_targets_message(num_classes, ranks=bad_ranks))
    x = _GatherRows.apply(x, sizes, rank, group)
    tgt = _gather_rows(tgt, sizes, group)
    if equal_batches:  # the gathered targets are the same on every rank: so is the check
        _check_targets(tgt[:, 0], tgt[:, 1], num_classes, rows_per_rank=b_rows)
    return x, tgt


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by ``factor`` in backward (see module doc)."""
    return t if factor == 1 else _GradScale.apply(t, float(factor))


# ----------------------------------------------------------------------------- the loss
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
        width = _block_width(chunk, m_rows, n_local)
        flat = x.new_empty(m_rows * width)  # the one block-sized buffer, in the compute dtype
        ctx.cache = None
        for c0 in range(0, n_local, width):
            c1 = min(n_local, c0 + width)
            z = _block_logits(x, w[c0:c1], None if b is None else b[c0:c1], flat[: m_rows * (c1 - c0)])
            for ids, hit, out in ((la, in_a, za), (lb, in_b, zb)):
                inb, col = _in_block(ids, hit, c0, c1)  # each target lies in one block: += is a set
                out += torch.where(inb, z.gather(1, col[:, None]).squeeze(1), 0.0)
            if eps:  # the eps/N term (a full pass over the logits): summed in >= fp32
                zsum += z.sum(1, dtype=stat)
            new_max = torch.maximum(rmax, z.amax(1).to(stat))
            rsum.mul_((rmax - new_max).exp_()).add_(_exp_rows_(z, new_max, want_sum=True))
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
                    gz = _scale_rows_(cache[0], (cache[1] - lse).exp_(), minus=eps / num_classes)
                else:
                    flat = x.new_empty(m_rows * width) if flat is None else flat
                    gz = _block_logits(x, wc, None if b is None else b[c0:c1], flat[: m_rows * (c1 - c0)])
                    _exp_rows_(gz, lse, minus=eps / num_classes)
                # p - q; here the (1-eps) * lam / (1-lam) target terms, added in >= fp32, rounded once
                for ids, hit, wt in ((la, in_a, lam), (lb, in_b, 1 - lam)):
                    inb, col = _in_block(ids, hit, c0, c1)
                    at = gz.gather(1, col[:, None]).squeeze(1)
                    gz.scatter_(1, col[:, None], torch.where(inb, at + (eps - 1) * wt, at).to(gz.dtype)[:, None])
                if need_w and gw.dtype == gz.dtype:
                    torch.mm(gz.t(), xs, out=gw[c0:c1])
                elif need_w:
                    gw[c0:c1] = gz.t() @ xs
                if need_x and gx.dtype == gz.dtype:
                    gx.addmm_(gz, wc)
                elif need_x:
                    gx += gz @ _fast_right_operand(wc)  # each block's partial rounded once, summed in fp32
                if need_b:
                    gb[c0:c1] = gz.sum(0, dtype=lse.dtype) * scale
        if need_x:
            gx = gx.mul_(scale).to(x.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _in_block(ids: torch.Tensor, hit: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' target (local class id ``ids``, on this rank where ``hit``) lies in the class
    block [c0, c1), and its column in the block (clamped into it for the other rows, whose
    contribution is masked to 0). Masks instead of index lists: no host sync on a GPU."""
    return hit & (ids >= c0) & (ids < c1), (ids - c0).clamp(0, c1 - c0 - 1)


def _block_width(chunk: int, m_rows: int, n_local: int) -> int:
    """Classes per block so that a block [M, width] holds at most ``chunk`` x n_local elements."""
    if chunk >= m_rows or n_local == 0:
        return max(n_local, 1)
    return max(1, chunk * n_local // m_rows)


def _block_logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
    """Logits [M, width] of a class block in x's (the compute) dtype, written into the contiguous
    buffer ``flat`` (no allocation per block; wider master weights are cast block by block)."""
    out = flat.view(x.shape[0], w.shape[0])
    torch.mm(x, w.to(x.dtype).t(), out=out)
    return out if b is None else out.add_(b.to(x.dtype))


def _fast_right_operand(wc: torch.Tensor) -> torch.Tensor:
    """``wc`` laid out for ``gz @ wc`` (a reduction over all of the block's classes). CPU bf16
    GEMMs with a row-major right operand and a long reduction fall off oneDNN's fast path
    (measured 40x slower than a column-major copy at 64 x 100k x 192); GPUs take either layout."""
    if wc.device.type == "cpu" and wc.dtype == torch.bfloat16:
        return wc.t().contiguous().t()
    return wc


def _exp_rows_(z: torch.Tensor, shift: torch.Tensor, minus: float = 0.0, want_sum: bool = False):
    """In place ``z <- exp(z - shift[:, None]) - minus``; with ``want_sum`` returns the row sums
    of exp(z - shift) [M] in shift's dtype (>= fp32).

    z in shift's dtype: plain in-place ops. Lower-precision z (bf16 logits): row slices are
    lifted to shift's dtype (``_lift_rows``), so the only rounding is the final store (relative
    2^-9). Rounding z - shift to bf16 before the exp would put up to 2^-9 * |z - shift|
    (|z - lse| ~ log N = 14 at N = 1.28M) into the exponent: ~3 % error on p.
    """
    if z.dtype == shift.dtype:
        z.sub_(shift[:, None]).exp_()
        sums = z.sum(1) if want_sum else None
        if minus:
            z.sub_(minus)
        return sums
    sums = shift.new_empty(z.shape[0]) if want_sum else None
    for rs in _lift_rows(z):
        part = z[rs].to(shift.dtype).sub_(shift[rs, None]).exp_()
        if want_sum:
            sums[rs] = part.sum(1)
        if minus:
            part.sub_(minus)
        z[rs] = part
    return sums


def _scale_rows_(e: torch.Tensor, factor: torch.Tensor, minus: float = 0.0) -> torch.Tensor:
    """In place ``e <- e * factor[:, None] - minus`` (p - eps/N from the kept exp(z - max)), computed
    in factor's dtype and rounded once for lower-precision e."""
    if e.dtype == factor.dtype:
        e.mul_(factor[:, None])
        return e.sub_(minus) if minus else e
    for rs in _lift_rows(e):
        e[rs] = e[rs].to(factor.dtype).mul_(factor[rs, None]).sub_(minus)
    return e


def _lift_rows(z: torch.Tensor) -> list[slice]:
    """Row slices of a low-precision block lifted to fp32 one at a time: 1/8 of the rows or
    2^20 elements, whichever is more (the fp32 temporary is at most a quarter of the bf16 block
    beyond 4 MB; 8 slices keep the kernel launches per block few on a GPU)."""
    m, width = z.shape
    rows = max(1, m // 8, _LIFT_ELEMS // max(width, 1))
    return [slice(r0, r0 + rows) for r0 in range(0, m, rows)]


def _compute_dtype(requested: Optional[torch.dtype], weight: torch.Tensor, device: torch.device) -> torch.dtype:
    """The dtype of features, matmuls and logits (statistics are always >= fp32).

    None follows a bf16 autocast (``parallel.mixed_precision: bf16``) for fp32 weights, as
    autocast would for an nn.Linear; fp16 is never chosen (p ~ 1/N falls into fp16's subnormals
    at large N), and a fp16 autocast leaves the loss in the weight's dtype."""
    if requested is None:
        bf16_autocast = torch.is_autocast_enabled(device.type) and \
            torch.get_autocast_dtype(device.type) == torch.bfloat16
        requested = torch.bfloat16 if bf16_autocast and weight.dtype == torch.float32 else weight.dtype
    if requested not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be bfloat16, float32 or float64, got {requested}")
    return requested


def _global_stats(lse_loc: torch.Tensor, tgt_loc: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp over all N classes and the summed target term [M] (two small
    all-reduces per call, independent of the chunk count)."""
    world = _group_rank_size(group)[1]
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
    rank, world = _group_rank_size(group)
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
    if not (target_a.shape == target_b.shape == lam.shape == (b_rows,)):
        raise ValueError(f"target_a/target_b/lam must be [{b_rows}], got {tuple(target_a.shape)}, "
                         f"{tuple(target_b.shape)}, {tuple(lam.shape)}")
    x = features.to(_compute_dtype(compute_dtype, weight_shard, features.device))
    # one [B, 3] float64 gather for the targets (ids < 2**53 are exact in float64)
    tgt = torch.stack([t.to(x.device, torch.float64) for t in (target_a, target_b, lam)], 1)
    if world == 1:
        _check_targets(target_a, target_b, num_classes)
    else:
        x, tgt = _gather_batch(x, tgt, num_classes, rank, world, group, equal_batches)
    a, bb = tgt[:, 0].long(), tgt[:, 1].long()
    chunk = x.shape[0] if chunk_size is None else min(int(chunk_size), max(x.shape[0], 1))
    with torch.autocast(x.device.type, enabled=False):
        return _ShardedSoftCE.apply(x, weight_shard, bias_shard, a, bb, tgt[:, 2], int(shard_start),
                                    int(num_classes), float(smoothing), max(chunk, 1), group)


# ----------------------------------------------------------------------------- init + re-sharding
def init_rows(seed: int, start: int, n: int, dim: int, std: float, dtype=torch.float32) -> torch.Tensor:
    """Rows [start, start+n) of the full N x D normal(0, std) init of ``seed``, built block by
    block (generator seeded by (seed, block index)) so the full matrix never exists and any
    sharding gives the same rows."""
    out = torch.empty(n, dim, dtype=dtype)
    gen = torch.Generator()
    blk0, blk1 = start // INIT_BLOCK_ROWS, (start + n - 1) // INIT_BLOCK_ROWS
    for blk in range(blk0, blk1 + 1 if n else blk0):
        gen.manual_seed(_block_seed(seed, blk))
        rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=gen)
        lo, hi = max(start, blk * INIT_BLOCK_ROWS), min(start + n, (blk + 1) * INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = rows[lo - blk * INIT_BLOCK_ROWS : hi - blk * INIT_BLOCK_ROWS] * std
    return out


def _block_seed(seed: int, block: int) -> int:
    # CPU generators keep only 32 bits of a seed, so (seed << 32 | block) would drop the seed: hash both
    digest = hashlib.blake2b(f"sharded_fc:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- module
class ShardedLinear(nn.Module):
    """This rank's shard of an N-way linear classifier: weight [n_local, D] = rows
    [shard_start, shard_start + n_local) of W [N, D]; optional bias [n_local] (zeros).

    Keep it out of DDP / FSDP / ZeRO wrapping and gradient sync (its gradient is already the
    exact gradient of the global loss). ``state_dict()`` carries the class range as extra state
    and refuses to load a shard of another range; use ``reshard`` when the world size changes.
    """

    def __init__(self, num_classes: int, dim: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 init_std: float = 0.02, bias: bool = False, group=None):
        super().__init__()
        self.num_classes, self.dim, self.rank, self.world_size, self.group = num_classes, dim, rank, world_size, group
        self.shard_start, self.n_local = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(init_rows(seed, self.shard_start, self.n_local, dim, init_std))
        self.bias = nn.Parameter(torch.zeros(self.n_local)) if bias else None

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, classes=[{self.shard_start}, "
                f"{self.shard_start + self.n_local}), rank={self.rank}/{self.world_size}, bias={self.bias is not None}")

    def _check_group(self) -> None:
        rank, world = _group_rank_size(self.group)
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(f"ShardedLinear built for rank {self.rank}/{self.world_size} but the process group "
                               f"is rank {rank}/{world}")

    def loss(self, features, target_a, target_b, lam, smoothing=0.0, chunk_size=None,
             compute_dtype=None, equal_batches=False) -> torch.Tensor:
        """``sharded_soft_cross_entropy`` with this shard (features [B, D] of this rank)."""
        self._check_group()
        return sharded_soft_cross_entropy(features, self.weight, self.shard_start, self.num_classes, target_a,
                                          target_b, lam, smoothing=smoothing, group=self.group,
                                          chunk_size=chunk_size, bias_shard=self.bias, compute_dtype=compute_dtype,
                                          equal_batches=equal_batches)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full W [N, D] on every rank (a collective; N x D memory: tests and small N only)."""
        self._check_group()
        if self.world_size == 1:
            return self.weight.detach()
        sizes = [shard_range(self.num_classes, r, self.world_size)[1] for r in range(self.world_size)]
        return _gather_rows(self.weight.detach(), sizes, self.group)

    def sharded_state_dict(self) -> dict:
        """{"weight": [n_local, D], ("bias": [n_local],) "shard_start", "num_classes", "world_size", "rank"}."""
        state = {"weight": self.weight.detach(), **self.get_extra_state()}
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        """Load a state of this exact class range (from ``sharded_state_dict`` or ``reshard``)."""
        self.set_extra_state(state)
        if (self.bias is None) != ("bias" not in state):
            raise ValueError(f"bias: module has {'no ' if self.bias is None else ''}bias, state disagrees")
        self.weight.copy_(state["weight"])
        if self.bias is not None:
            self.bias.copy_(state["bias"])

    def get_extra_state(self) -> dict:
        return {"shard_start": self.shard_start, "num_classes": self.num_classes,
                "world_size": self.world_size, "rank": self.rank}

    def set_extra_state(self, state: dict) -> None:
        n = state["weight"].shape[0] if "weight" in state else self.n_local
        if (state["num_classes"], state["shard_start"], n) != (self.num_classes, self.shard_start, self.n_local):
            raise ValueError(
                f"classifier shard mismatch: saved classes [{state['shard_start']}, ...) of {state['num_classes']} "
                f"(world size {state.get('world_size')}), this rank holds [{self.shard_start}, "
                f"{self.shard_start + self.n_local}) of {self.num_classes}; re-shard with ShardedLinear.reshard")

    @staticmethod
    def reshard(states: list[dict], rank: int, world_size: int) -> dict:
        """From every old rank's ``sharded_state_dict`` (any order, any old world size) to the
        state of ``rank`` in a layout of ``world_size`` ranks (same keys, new range)."""
        if not states:
            raise ValueError("reshard: no states given")
        start, n = shard_range(int(states[0]["num_classes"]), rank, world_size)
        return {**reshard_state(states, start, n), "world_size": world_size, "rank": rank}
