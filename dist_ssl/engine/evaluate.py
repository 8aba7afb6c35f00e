"""Top-1 / top-5 of a method's classifier on ``data.val``, over all ranks.

Every rank runs the same number of forward calls (FSDP2 and ZeRO-3 gather parameters inside
forward, so a rank that stops early would hang the others): the loader is streamed (one batch
in memory, whatever the size of the eval set), each step all-reduces whether any rank still
has a batch, and ranks that ran out repeat their last batch and discard the result.
"""
from __future__ import annotations

import torch

from dist_ssl.methods.base import Method


@torch.no_grad()
def evaluate_topk(method: Method, loader, device: torch.device, world_size: int,
                  cast_dtype: torch.dtype | None = None) -> dict[str, float] | None:
    """{"top1", "top5", "num_samples"} or None when the method has no classifier (learnt from
    the first forward, so only one batch is decoded for it)."""
    was_training = method.training
    method.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, seen
    batches, template = iter(loader), None
    try:
        while True:
            batch = next(batches, None)
            # [any rank has a batch, some rank has none and never had one]: one tiny all-reduce per step
            flags = torch.tensor([batch is not None, batch is None and template is None], device=device)
            if world_size > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if not flags[0]:
                break
            if flags[1]:  # raised on every rank together, so none is left waiting in a collective
                raise RuntimeError("evaluation: a rank got no eval samples; use fewer ranks or more data")
            template = batch if batch is not None else template
            x = template["views"][0].to(device)
            logits = method.classify(x if cast_dtype is None else x.to(cast_dtype))
            if logits is None:
                return None
            if batch is None:
                continue
            y = batch["label"].to(device)
            k = min(5, logits.shape[-1])
            top = logits.float().topk(k, dim=-1).indices
            counts[0] += (top[:, 0] == y).sum()
            counts[1] += (top == y[:, None]).any(dim=-1).sum()
            counts[2] += y.numel()
    finally:
        method.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    seen = max(counts[2].item(), 1.0)
    return {"top1": counts[0].item() / seen, "top5": counts[1].item() / seen,
            "num_samples": int(counts[2].item())}
