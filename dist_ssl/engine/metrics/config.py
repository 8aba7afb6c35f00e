"""``MetricsConfig`` and the factory that turns it into the sinks of one process."""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from dist_ssl.config.errors import ConfigError
from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc
from dist_ssl.run_files import METRICS_LOG_FILE

from .jsonl import JSONLSink
from .prometheus import PrometheusSink, prometheus_port
from .sink import MultiSink

__all__ = ["MetricsConfig", "build_sinks"]


@dataclass
class MetricsConfig:
    """Where metrics go. JSONL is always on (rank 0); the others are opt-in."""

    jsonl_name: str = doc(METRICS_LOG_FILE, "JSONL file name inside the run dir")
    tensorboard: bool = doc(False, "also write TensorBoard events to <run_dir>/tb")
    prometheus: bool = doc(False, "serve per-rank Prometheus gauges over HTTP")
    prometheus_port_base: int = doc(9400, "exporter port of local rank 0; local rank r uses base + r")
    prometheus_host: str = doc("127.0.0.1", "exporter bind address; 0.0.0.0 exposes it to the network")
    log_every_steps: int = doc(10, "log every N optimizer steps (each log syncs the device)")
    verbose: bool = doc(False, "also show INFO logs of accelerate, DeepSpeed, torch.distributed "
                               "(WARNING and above otherwise); tools/train.py -v does the same")

    def validate(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps: must be >= 1, got {self.log_every_steps}")
        if not 0 < self.prometheus_port_base < 65536:
            raise ValueError(f"prometheus_port_base: not a valid port: {self.prometheus_port_base}")
        name = self.jsonl_name
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"jsonl_name: must be a plain file name inside the run dir, got {name!r}")
        if not self.prometheus_host:
            raise ValueError("prometheus_host: must not be empty")


register_section("metrics", MetricsConfig)


def _prometheus_sink(cfg: MetricsConfig, *, run: str, rank: int, local_rank: int) -> PrometheusSink:
    """The exporter, or a one-line ConfigError for a port in use / a host that is not this machine."""
    port, host = prometheus_port(cfg.prometheus_port_base, local_rank), cfg.prometheus_host
    try:
        return PrometheusSink(port, host=host, run=run, rank=rank)
    except socket.gaierror as exc:
        raise ConfigError("metrics.prometheus_host", f"cannot resolve {host!r} ({exc.strerror}); use an address "
                          "of this machine, e.g. 127.0.0.1") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError("metrics.prometheus_port_base", f"port {port} on {host} is already in use (local rank "
                              f"{local_rank} uses base + {local_rank}); choose another base or stop the process "
                              "holding it") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("metrics.prometheus_host", f"{host!r} is not an address of this machine; use one of "
                              "its addresses, e.g. 127.0.0.1") from None
        raise ConfigError("metrics.prometheus_port_base", f"cannot serve on {host}:{port} ({exc})") from None


def build_sinks(cfg: MetricsConfig, run_dir: str | Path, *, run: str, rank: int, local_rank: int,
                is_main: bool) -> MultiSink:
    """Sinks for this process: JSONL and TensorBoard on the main process only (one writer per
    file), Prometheus on every rank (each rank exports its own step time, memory, ...)."""
    run_dir = Path(run_dir)
    sinks = MultiSink()
    try:
        if is_main:
            sinks.add(JSONLSink(run_dir / cfg.jsonl_name))
            if cfg.tensorboard:
                from .tensorboard import TensorBoardSink  # lazy: tensorboard is optional

                sinks.add(TensorBoardSink(run_dir / "tb"))
        if cfg.prometheus:
            sinks.add(_prometheus_sink(cfg, run=run, rank=rank, local_rank=local_rank))
    except BaseException:
        sinks.close()  # do not leak an open file or bound port when a later sink fails
        raise
    return sinks
