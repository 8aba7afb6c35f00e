"""Prometheus sink: per-process gauges served over HTTP from a private registry.

Each process (rank) serves its own exporter on ``port_base + local_rank`` so every rank on a
node is scraped separately; gauges carry ``run`` and ``rank`` labels so dashboards can
aggregate across nodes. A private ``CollectorRegistry`` (never the global ``REGISTRY``) means
two sinks in one process (tests, eval + train) cannot clash on metric names, and nothing the
process imports can leak unrelated metrics into the scrape. Bound to 127.0.0.1 by default:
exposing it needs an explicit ``metrics.prometheus_host``.
"""
from __future__ import annotations

import logging
from typing import Mapping

from .sink import MetricSink, scalarize

logger = logging.getLogger(__name__)

__all__ = ["PrometheusSink", "prometheus_port", "GAUGES"]

# Canonical metric key -> (Prometheus gauge name, help). Units are in the names, as Prometheus
# naming conventions ask. Only kind="train" values feed these; everything else goes to the
# generic ``dist_ssl_metric{kind=..., name=...}`` gauge.
GAUGES: dict[str, tuple[str, str]] = {
    "loss": ("dist_ssl_loss", "training loss (last logged step)"),
    "lr": ("dist_ssl_lr", "learning rate of the lr_scale=1 group"),
    "images_per_sec": ("dist_ssl_images_per_second", "global training throughput"),
    "samples_seen": ("dist_ssl_samples_seen", "images consumed since the start of the run"),
    "step_time": ("dist_ssl_step_time_seconds", "wall time of one optimizer step"),
    "data_wait_fraction": ("dist_ssl_data_wait_fraction", "share of step time waiting on data"),
    "mem_peak_bytes": ("dist_ssl_memory_peak_bytes", "peak accelerator or RSS memory"),
    "mem_current_bytes": ("dist_ssl_memory_current_bytes", "current accelerator or RSS memory"),
}


def prometheus_port(port_base: int, local_rank: int) -> int:
    """Exporter port for a process: one port per local rank, so ranks on a node never collide."""
    port = port_base + local_rank
    if not 0 < port < 65536:
        raise ValueError(f"prometheus_port_base: {port_base} + local_rank {local_rank} is not a valid port")
    return port


class PrometheusSink(MetricSink):
    """Gauges ``dist_ssl_*{run, rank}`` plus ``dist_ssl_step``, served at ``http://host:port/metrics``.

    ``port=0`` binds a free port (read it back from ``.port``). ``close`` stops the HTTP server
    and releases the port.
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", run: str, rank: int) -> None:
        # Deferred so importing the metrics package does not require prometheus-client.
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("run", "rank")
        self._labels = {"run": str(run), "rank": str(rank)}
        self._gauges = {
            key: Gauge(name, doc, labels, registry=self.registry) for key, (name, doc) in GAUGES.items()
        }
        self._step = Gauge("dist_ssl_step", "global optimizer step", labels, registry=self.registry)
        self._other = Gauge("dist_ssl_metric", "any other logged scalar",
                            labels + ("kind", "name"), registry=self.registry)
        result = start_http_server(port, addr=host, registry=self.registry)
        # prometheus-client >= 0.20 returns (server, thread); older versions return None and
        # cannot be stopped, which would leak the port across tests.
        if result is None:
            raise RuntimeError("prometheus-client too old: start_http_server must return (server, thread)")
        self._server, self._thread = result
        self.host = host
        self.port = int(self._server.server_port)
        logger.info("Prometheus exporter for run=%s rank=%s on http://%s:%d/metrics", run, rank, host, self.port)

    def log(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
        if self._server is None:
            raise RuntimeError("PrometheusSink is closed")
        values = scalarize(metrics)
        if kind == "train":
            self._step.labels(**self._labels).set(int(step))
        for key, value in values.items():
            if kind == "train" and key in self._gauges:
                self._gauges[key].labels(**self._labels).set(value)
            else:
                self._other.labels(kind=kind, name=key, **self._labels).set(value)

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # stops serve_forever (polls every 0.5 s)
        self._server.server_close()  # releases the listening socket
        self._thread.join(timeout=5)
        self._server = None
