"""Top-1 / top-5 of a method's classifier on ``data.val``, over all ranks.

Every rank runs the same number of forward calls (FSDP2 and ZeRO-3 gather parameters inside
forward, so a rank that stops early would hang the others): ranks with fewer eval batches
run dummy batches whose results are discarded.
"""
from __future__ import annotations

import torch

from dist_ssl.methods.base import Method


@torch.no_grad()
def evaluate_topk(method: Method, loader, device: torch.device, world_size: int,
                  cast_dtype: torch.dtype | None = None) -> dict[str, float] | None:
    """{"top1", "top5", "num_samples"} or None when the method has no classifier."""
    was_training = method.training
    method.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, seen
    batches = list(iter(loader))  # eval sets are small; their decode cost is the loader's
    num = torch.tensor([len(batches)], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(num, op=torch.distributed.ReduceOp.MAX)
    template = None
    try:
        for i in range(int(num.item())):
            real = i < len(batches)
            if real:
                template = batches[i]
            x = template["views"][0].to(device) if template is not None else None
            if x is None:  # this rank has no eval data at all: shape from the first other call
                raise RuntimeError("evaluation: a rank got no eval samples; use fewer ranks or more data")
            if cast_dtype is not None:
                x = x.to(cast_dtype)
            logits = method.classify(x)
            if logits is None:
                return None
            if not real:
                continue
            y = template["label"].to(device)
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
