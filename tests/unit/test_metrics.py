"""Metric sinks: JSONL append, TensorBoard event files, Prometheus exporter over real HTTP."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dist_ssl.engine.metrics import (
    JSONLSink, MetricsConfig, MetricSink, MultiSink, PrometheusSink, build_sinks, memory_stats,
    prometheus_port, scalarize,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_jsonl_appends_valid_lines_across_reopen(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with JSONLSink(path) as sink:
        sink.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3)})
        sink.log(2, {"loss": float("nan")})
        assert len(path.read_text().splitlines()) == 2  # flushed before close
    sink = JSONLSink(path)  # resume continues the same file
    sink.log(3, {"acc": 0.5}, kind="val")
    with pytest.raises(ValueError, match="reserved"):
        sink.log(4, {"step": 1.0})
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 2.5 and records[0]["lr"] == pytest.approx(1e-3)
    assert records[1]["loss"] is None  # NaN is not valid JSON
    assert records[2]["kind"] == "val" and records[0]["kind"] == "train"


def test_tensorboard_event_file_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_ssl.engine.metrics import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    for step in (10, 20):
        sink.log(step, {"loss": step / 10})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(10, 1.0), (20, 2.0)]


def test_prometheus_two_sinks_serve_own_gauges_then_stop():
    port_a, port_b = _free_port(), 0  # explicit free port, and OS-assigned
    a = PrometheusSink(port_a, run="runA", rank=0)
    b = PrometheusSink(port_b, run="runB", rank=3)
    try:
        assert a.port == port_a and b.port > 0
        a.log(42, {"loss": 1.25, "lr": 3e-4, "images_per_sec": 900.0, "step_time": 0.5,
                   "data_wait_fraction": 0.1, "samples_seen": 4096, "mem_peak_bytes": 1e9, "loss_dino": 0.7})
        a.log(42, {"knn_top1": 0.6}, kind="val")
        b.log(7, {"loss": 9.0})
        got_a, got_b = _scrape(a.port), _scrape(b.port)
        la = frozenset({"run": "runA", "rank": "0"}.items())
        expected = {"dist_ssl_loss": 1.25, "dist_ssl_lr": 3e-4, "dist_ssl_images_per_second": 900.0,
                    "dist_ssl_step_time_seconds": 0.5, "dist_ssl_data_wait_fraction": 0.1,
                    "dist_ssl_samples_seen": 4096.0, "dist_ssl_memory_peak_bytes": 1e9, "dist_ssl_step": 42.0}
        for name, value in expected.items():
            assert got_a[(name, la)] == pytest.approx(value), name
        assert got_a[("dist_ssl_metric", la | {("kind", "train"), ("name", "loss_dino")})] == 0.7
        assert got_a[("dist_ssl_metric", la | {("kind", "val"), ("name", "knn_top1")})] == 0.6
        lb = frozenset({"run": "runB", "rank": "3"}.items())
        assert got_b[("dist_ssl_loss", lb)] == 9.0 and got_b[("dist_ssl_step", lb)] == 7.0
        # Own registries: neither exporter shows the other's run (nor the global registry's
        # process/python collectors).
        assert not any(("run", "runB") in labels for _, labels in got_a)
        assert not any(name.startswith(("process_", "python_")) for name, _ in got_a)
    finally:
        a.close()
        b.close()
    for port in (a.port, b.port):
        with pytest.raises(urllib.error.URLError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        assert isinstance(err.value.reason, ConnectionRefusedError)
    a.close()  # idempotent


def test_prometheus_port_helper():
    assert prometheus_port(9400, 3) == 9403
    with pytest.raises(ValueError, match="prometheus_port_base"):
        prometheus_port(65535, 1)


def test_multisink_fans_out_and_closes_all():
    class Recorder(MetricSink):
        def __init__(self, fail: bool = False) -> None:
            self.calls, self.closed, self.fail = [], False, fail

        def log(self, step, metrics, *, kind="train"):
            self.calls.append((step, dict(metrics), kind))

        def close(self):
            self.closed = True
            if self.fail:
                raise OSError("disk full")

    r1, r2 = Recorder(fail=True), Recorder()
    sinks = MultiSink([r1, r2])
    sinks.log(5, {"loss": torch.tensor(2.0)}, kind="val")
    assert r1.calls == r2.calls == [(5, {"loss": 2.0}, "val")]
    assert type(r2.calls[0][1]["loss"]) is float
    with pytest.raises(OSError):
        sinks.close()
    assert r1.closed and r2.closed
    with pytest.raises(TypeError, match="'tag'"):
        scalarize({"tag": "abc"})


def test_memory_stats_cpu_units():
    x = torch.ones(32 * 2**20, dtype=torch.uint8)  # touch 32 MiB so RSS is clearly non-trivial
    stats = memory_stats("cpu")
    assert stats["mem_current_bytes"] > 32 * 2**20
    # ru_maxrss is in KiB on Linux: a missing * 1024 makes peak ~1000x below current.
    assert stats["mem_peak_bytes"] >= 0.9 * stats["mem_current_bytes"]
    del x


def test_build_sinks_and_config(tmp_path):
    cfg = MetricsConfig(tensorboard=True, prometheus=True, prometheus_port_base=_free_port())
    cfg.validate()
    main = build_sinks(cfg, tmp_path, run="r", rank=0, local_rank=0, is_main=True)
    other = build_sinks(MetricsConfig(), tmp_path, run="r", rank=1, local_rank=1, is_main=False)
    try:
        assert [type(s).__name__ for s in main.sinks] == ["JSONLSink", "TensorBoardSink", "PrometheusSink"]
        assert main.sinks[2].port == cfg.prometheus_port_base
        assert other.sinks == []  # non-main rank without Prometheus writes nothing
        main.log(1, {"loss": 1.0})
    finally:
        main.close()
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] == 1.0
    with pytest.raises(ValueError, match="^log_every_steps:"):
        MetricsConfig(log_every_steps=0).validate()
