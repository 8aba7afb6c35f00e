"""SIGTERM / SIGUSR1 (SLURM's preemption signals): finish the step, checkpoint, exit 75.

The handler only sets a flag; the trainer agrees on it across ranks (one all-reduce of one int)
so every rank stops at the same step and the checkpoint is collective. Reading the agreed flag
is a host sync that drains the device's queue, so it happens only at the steps ``check_due``
names: every ``train.preemption_check_steps`` optimizer steps, at epoch ends and at the last
step, the same global steps on every rank (the collective stays aligned). The delay this adds is
a few steps, well inside SLURM's ``--signal`` grace of tens of seconds. Exit code
``REQUEUE_EXIT_CODE`` (75, EX_TEMPFAIL) means "checkpointed cleanly, requeue me"; the SLURM
batch script keys its requeue on it.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def check_due(step: int, every: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether ranks agree on the flag after optimizer step ``step`` (1-based): a function of the
    global step alone, so every rank calls the collective at the same steps."""
    return step % every == 0 or step % steps_per_epoch == 0 or step >= total_steps


class PreemptionFlag:
    """Installs handlers for SIGNALS (main thread only) and restores the old ones on close."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        # logging from a handler can deadlock on the logging lock; only set the flag here
        self.signum = signum

    def agreed(self, device: torch.device, world_size: int) -> bool:
        """True on every rank once any rank has been signalled (collective when distributed)."""
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
