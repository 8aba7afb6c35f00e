"""Full (unsharded) values of parameters, whatever shards them: for momentum teachers and EMAs.

- FSDP2 parameters are DTensors: ``full_tensor()`` all-gathers each one.
- DeepSpeed ZeRO-3 partitions parameters in place (``ds_id``; ``p.data`` is empty outside
  forward): ``deepspeed.zero.GatheredParameters`` all-gathers them for the duration of the
  ``with`` block and re-partitions on exit without writing anything back (modifier_rank=None).
- Anything else (plain, DDP, ZeRO-1/2) is returned as is.

Sharded cases are collectives: every rank must enter with the same parameters in the same
order. Memory: ZeRO-3 gathers the listed parameters together (one extra full copy of them while
the block runs); pass a sub-list to bound it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


@contextmanager
def full_parameters(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``with full_parameters(ps) as full:`` full[i] is the whole value of ps[i] (read only)."""
    params = list(params)
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        yield [_dtensor_full(p) for p in params]
        return
    import deepspeed  # only ZeRO-3 runs get here, and they have it

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield [_dtensor_full(p) for p in params]


def _dtensor_full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # torch.distributed.tensor.DTensor (FSDP2)
    return full_tensor() if callable(full_tensor) else t
