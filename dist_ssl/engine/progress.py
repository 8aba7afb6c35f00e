"""Rank-0 progress bar: optimizer steps, loss, images/s and ETA (tqdm's)."""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch


class Progress:
    def __init__(self, total: int, *, enabled: bool, start: int = 0):
        self.bar = None
        # off when not on rank 0, or when asked (CI logs don't want carriage returns)
        if enabled and os.environ.get("DIST_SSL_PROGRESS", "1") != "0":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=not sys.stderr.isatty() and
                            os.environ.get("DIST_SSL_PROGRESS") != "1")

    def update(self, step: int, images_per_sec: float, loss: Optional[torch.Tensor] = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        post = {"img/s": f"{images_per_sec:.0f}"}
        if loss is not None:  # only on log steps: .item() syncs the device
            post["loss"] = f"{loss.item():.4f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
