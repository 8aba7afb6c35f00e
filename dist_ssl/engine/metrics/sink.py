"""The one metrics interface: ``MetricSink.log(step, metrics, kind=...)`` and ``close()``.

Every backend (JSONL, TensorBoard, Prometheus) implements it; the trainer only talks to a
:class:`MultiSink`. Values are converted to Python floats here, once, so each backend sees the
same numbers; converting a CUDA tensor forces a device sync, which is why the trainer logs
every ``log_every_steps`` steps rather than every step.

Canonical metric keys the trainer emits (Prometheus maps them to named gauges; any other key
is still logged everywhere): ``loss``, ``lr``, ``images_per_sec``, ``samples_seen``,
``step_time`` (seconds), ``data_wait_fraction`` (0-1 share of step time spent waiting on data),
``mem_peak_bytes``, ``mem_current_bytes``, plus loss parts (``loss_*``) and ``grad_norm``.
"""
from __future__ import annotations

import abc
import logging
import numbers
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["MetricSink", "MultiSink", "scalarize"]


def scalarize(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{name: float}`` from numbers, bools, 0-d/1-element tensors or numpy scalars.

    Raises TypeError naming the key for anything else (a silently dropped metric is worse).
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        if hasattr(v, "item") and callable(v.item):  # torch.Tensor / numpy scalar
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise TypeError(f"metric {k!r}: expected a real number, got {type(v).__name__}")
        out[k] = float(v)
    return out


class MetricSink(abc.ABC):
    """A destination for scalar metrics. ``kind`` separates streams: "train", "val", "eval", ..."""

    @abc.abstractmethod
    def log(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
        """Record ``metrics`` at global optimizer step ``step``."""

    def rewind(self, step: int) -> None:
        """The run continues from ``step`` (a resume): forget what was logged for later steps,
        which are about to be logged again. Sinks that keep no history do nothing."""

    def close(self) -> None:
        """Flush and release resources (files, sockets). Idempotent."""

    def __enter__(self) -> "MetricSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiSink(MetricSink):
    """Fan-out to several sinks; values are scalarized once for all of them."""

    def __init__(self, sinks: Iterable[MetricSink] = ()) -> None:
        self.sinks: list[MetricSink] = list(sinks)

    def add(self, sink: MetricSink) -> None:
        self.sinks.append(sink)

    def log(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
        values = scalarize(metrics)
        for sink in self.sinks:
            sink.log(step, values, kind=kind)

    def rewind(self, step: int) -> None:
        for sink in self.sinks:
            sink.rewind(step)

    def close(self) -> None:
        # Close every sink even if one fails (e.g. a full disk must not leave the exporter
        # port bound), then re-raise the first error.
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - re-raised below
                logger.error("closing %s failed: %s", type(sink).__name__, e)
                first = first or e
        if first is not None:
            raise first
