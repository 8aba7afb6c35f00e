"""Metric sinks behind one interface: JSONL (always), TensorBoard and Prometheus (opt-in).

``TensorBoardSink`` is imported lazily (attribute access) so tensorboard stays optional, and
``memory_stats`` so that importing this package (the run config imports ``.config``) does not
import torch.
"""
from __future__ import annotations

from .config import MetricsConfig, build_sinks
from .jsonl import JSONLSink
from .prometheus import GAUGES, PrometheusSink, prometheus_port
from .sink import MetricSink, MultiSink, scalarize

__all__ = [
    "MetricSink", "MultiSink", "scalarize", "JSONLSink", "TensorBoardSink", "PrometheusSink",
    "prometheus_port", "GAUGES", "MetricsConfig", "build_sinks", "memory_stats",
]


def __getattr__(name: str):
    if name == "TensorBoardSink":
        from .tensorboard import TensorBoardSink

        return TensorBoardSink
    if name == "memory_stats":
        from .system import memory_stats

        return memory_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
