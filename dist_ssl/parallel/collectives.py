"""Collectives that work with or without an initialised process group.

Without ``torch.distributed`` initialised (plain single process, unit tests) every helper
degrades to the world-size-1 answer, so library code can call them unconditionally.

Shape legend: [N, *] = rows on this rank (dim 0 may differ between ranks), [M, *] = rows of
all ranks concatenated in rank order (M = sum of every rank's N).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_reduce_mean",
    "all_gather_cat",
    "all_gather_with_grad",
    "broadcast_object",
    "all_gather_object",
]


def is_dist() -> bool:
    """True when a default process group exists (DDP, FSDP and DeepSpeed all create one)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new tensor (no grad; integer input is promoted to float).

    For logging and metrics; the input is left untouched.
    """
    out = t.detach().clone() if t.is_floating_point() else t.detach().float()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Dim-0 length of every rank (one tiny all_gather)."""
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of [N, *] tensors with possibly different N -> [M, *] (padding is removed)."""
    t = t.contiguous()
    n_max = max(sizes)
    if t.shape[0] < n_max:  # all_gather needs equal shapes: pad, gather, cut the padding off
        pad = t.new_zeros((n_max - t.shape[0], *t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """[N, *] on each rank -> [M, *] on every rank, in rank order; no gradient.

    Ranks may hold different N (e.g. the last eval shard); that costs one extra tiny collective.
    """
    if get_world_size() == 1:
        return t.detach().clone()
    return _gather_padded(t.detach(), _gather_sizes(t.shape[0], t.device))


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather whose backward hands each rank the gradient of its own rows, summed over ranks.

    Every rank's loss depends on every rank's rows, so d(sum of all ranks' losses)/d(my rows)
    = sum over ranks of the gradient w.r.t. my slice: all_reduce(SUM) the full gradient and
    keep my slice. (DDP/FSDP/ZeRO then divide by world size, which gives the gradient of the
    mean loss.) all_reduce instead of reduce_scatter keeps uneven N simple; the gathered
    tensors here are embeddings (M x D, small), so the extra traffic does not matter.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(t.shape[0], t.device)
        rank = get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """[N, *] on each rank -> [M, *], differentiable: gradients flow back to the producing rank.

    Used by losses that compare local samples against the global batch (InfoNCE negatives,
    SupCon). Every rank must call it the same number of times (it is a collective in both the
    forward and the backward pass).
    """
    if get_world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s ``obj`` on every rank (pickled; for small things: paths, seeds, names)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank (for small things only)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
