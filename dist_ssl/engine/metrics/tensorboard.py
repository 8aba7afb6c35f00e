"""TensorBoard sink over ``torch.utils.tensorboard.SummaryWriter`` (imported lazily).

The import is deferred to construction so the tensorboard package is only needed when the
sink is enabled (``metrics.tensorboard=true``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .sink import MetricSink, scalarize

__all__ = ["TensorBoardSink"]


class TensorBoardSink(MetricSink):
    """Scalars under the tag ``"<kind>/<name>"`` (e.g. ``train/loss``) at x = global step.

    ``flush_secs`` bounds how stale the event file may be; ``close`` flushes everything.
    """

    def __init__(self, log_dir: str | Path, *, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "metrics.tensorboard=true needs the 'tensorboard' package (pip install tensorboard)"
            ) from e
        self.log_dir = Path(log_dir)
        self._flush_secs = flush_secs
        self._had_events = any(self.log_dir.glob("events.out.tfevents.*"))  # a run being resumed
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
        if self._writer is None:
            raise RuntimeError(f"TensorBoardSink({self.log_dir}) is closed")
        for name, value in scalarize(metrics).items():
            self._writer.add_scalar(f"{kind}/{name}", value, global_step=int(step))

    def rewind(self, step: int) -> None:
        """New event file whose ``purge_step`` makes TensorBoard drop the older files' events
        after ``step`` (the run redoes them)."""
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None:
            raise RuntimeError(f"TensorBoardSink({self.log_dir}) is closed")
        if not self._had_events:
            return  # nothing logged before this run
        self._writer.close()
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self._flush_secs,
                                     purge_step=int(step) + 1)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
