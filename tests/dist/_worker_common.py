"""Pieces the multi-process workers of tests/dist share (imported by file name: every worker's
folder is on sys.path, as the script's own folder under a launcher or put there by its test).

``counting_all_gathers``: how many all_gathers a loss made (the ``equal_batches`` promise must
save the size gather). ``full_batch_losses``: the single-process reference training a worker
compares its ranks with. ``leave_launch``: the end of an ``accelerate launch``ed worker.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


@contextmanager
def counting_all_gathers():
    """Counts ``torch.distributed.all_gather`` calls (the package calls it through the module,
    so patching the module attribute sees every call)."""
    count = [0]
    original = dist.all_gather

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    dist.all_gather = counted
    try:
        yield count
    finally:
        dist.all_gather = original


def full_batch_losses(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor,
                      y: torch.Tensor, steps: int, sched: Optional[object] = None) -> Iterator[float]:
    """One process, the whole batch, plain torch: yields each step's loss after its update (the
    caller may read the model between steps)."""
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        yield loss.item()


def leave_launch(acc) -> None:
    """Barrier, end the process group, and exit 0 without interpreter teardown. All work and the
    collective teardown are done; DeepSpeed's CPU shm-comm op occasionally aborts in C++
    destructors at interpreter exit ("terminate called without an active exception", seen once
    in a CI run under load 13), so leave without running them."""
    acc.wait_for_everyone()
    acc.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
