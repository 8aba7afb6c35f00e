"""The global batch of the sharded classifier: row gathers with autograd, target range checks,
and ``grad_scale``.

Every rank computes logits of the global batch for its own classes (see ``sharded_soft_ce``), so
this rank's features x [B, D] and packed targets [B, 3] are all-gathered to [M, D], [M, 3] in rank
order (B may differ between ranks). The feature gather's backward sums every rank's partial
gradient of this rank's rows. Target ids are range-checked so that every rank raises together:
a rank raising alone would leave the others waiting in a collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def group_rank_size(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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


def check_targets(target_a: torch.Tensor, target_b: torch.Tensor, num_classes: int,
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


def gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
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
        return gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, n_max = ctx.sizes, max(ctx.sizes)
        pieces = [_pad_rows(g, n_max).contiguous() for g in grad.split(sizes)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, op=dist.ReduceOp.SUM, group=ctx.group)
        return out[: sizes[ctx.rank]], None, None, None


def gather_batch(x: torch.Tensor, tgt: torch.Tensor, num_classes: int, rank: int, world: int, group,
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
    tgt = gather_rows(tgt, sizes, group)
    if equal_batches:  # the gathered targets are the same on every rank: so is the check
        check_targets(tgt[:, 0], tgt[:, 1], num_classes, rows_per_rank=b_rows)
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
    """Identity in forward; multiplies the gradient by ``factor`` in backward. A data-parallel
    wrapper that averages backbone gradients over P ranks turns the sharded loss's exact dL/dx into
    dL/dx / P: ``grad_scale(features, P)`` before the loss undoes that (see ``sharded_soft_ce``)."""
    return t if factor == 1 else _GradScale.apply(t, float(factor))
