"""Re-sharding of row-sharded classifier state (weights, biases, AdamW rows) between world sizes.

A checkpoint of ``dist_ssl.parallel.sharded_fc.ShardedLinear`` holds one state per rank with its
class range (``shard_start`` + rows); loading it with another world size assembles each new
rank's rows from the old shards that overlap them. Only the overlapping rows are copied, so a
rank never needs the full N x D matrix (the old shards themselves must be loadable, though:
``torch.load(..., mmap=True)`` keeps that cheap).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["reshard_rows", "reshard_state"]


def reshard_rows(tensors_by_old_rank: Sequence[torch.Tensor], old_starts: Sequence[int], new_start: int,
                 new_n: int) -> torch.Tensor:
    """Rows [new_start, new_start + new_n) of the row-sharded tensor whose old shards are
    ``tensors_by_old_rank`` (each [n_old_r, *], first row = global row ``old_starts[r]``).
    For weights, biases and per-row optimizer state (AdamW exp_avg / exp_avg_sq). Raises when
    the old shards leave a gap or overlap inside the requested range."""
    if len(tensors_by_old_rank) != len(old_starts) or not tensors_by_old_rank:
        raise ValueError("reshard_rows: need one start per old shard, and at least one shard")
    parts, at = [], new_start
    for s, t in sorted(zip(old_starts, tensors_by_old_rank), key=lambda p: p[0]):
        lo, hi = max(s, at), min(s + t.shape[0], new_start + new_n)
        if lo >= hi:
            continue
        if lo != at:
            raise ValueError(f"reshard_rows: rows [{at}, {lo}) are in no old shard (or shards overlap)")
        parts.append(t[lo - s : hi - s])
        at = hi
    if at != new_start + new_n:
        raise ValueError(f"reshard_rows: rows [{at}, {new_start + new_n}) are in no old shard")
    ref = tensors_by_old_rank[0]
    return torch.cat(parts) if parts else ref.new_empty((0, *ref.shape[1:]))


def reshard_state(states: Sequence[dict], start: int, n: int) -> dict:
    """{"weight", ("bias",) "shard_start", "num_classes"} of rows [start, start + n) from every
    old shard's state (any order); raises when they disagree on N or leave a gap."""
    num_classes = int(states[0]["num_classes"])
    if any(int(s["num_classes"]) != num_classes for s in states):
        raise ValueError(f"reshard: states disagree on num_classes: {sorted({s['num_classes'] for s in states})}")
    if "bias" in states[0] and not all("bias" in s for s in states):
        raise ValueError("reshard: some old shards have a bias and some do not")
    starts = [int(s["shard_start"]) for s in states]
    out = {"weight": reshard_rows([s["weight"] for s in states], starts, start, n),
           "shard_start": start, "num_classes": num_classes}
    if "bias" in states[0]:
        out["bias"] = reshard_rows([s["bias"] for s in states], starts, start, n)
    return out
