"""After a resume the metric sinks hold one row per step: rows of the redone steps are replaced."""
from __future__ import annotations

import json

from dist_ssl.engine.metrics import JSONLSink, MetricsConfig, build_sinks


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rewind_drops_the_steps_that_are_redone(tmp_path):
    path = tmp_path / "log.jsonl"
    with JSONLSink(path) as sink:  # the first run: checkpoint at step 2, killed after step 4
        for step in (1, 2, 3, 4):
            sink.log(step, {"loss": float(step)})
        sink.log(2, {"top1": 0.5}, kind="eval")
    with open(path, "a") as f:
        f.write('{"step": 5, "kind": "train", "lo')  # the kill cut the last line
    sink = JSONLSink(path)  # the resumed run
    sink.rewind(2)
    for step in (3, 4, 5):
        sink.log(step, {"loss": 10.0 + step})
    sink.close()
    rows = _rows(path)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                      ("train", 4), ("train", 5)]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [1.0, 2.0, 13.0, 14.0, 15.0]


def test_jsonl_row_logged_again_replaces_the_old_one(tmp_path):
    path = tmp_path / "log.jsonl"
    with JSONLSink(path) as sink:
        sink.log(12, {"top1": 0.25}, kind="eval")
    with JSONLSink(path) as sink:  # a resume at the end evaluates step 12 again
        sink.rewind(12)
        sink.log(12, {"top1": 0.5}, kind="eval")
        sink.log(12, {"loss": 1.0})
    assert [(r["kind"], r["step"], r.get("top1")) for r in _rows(path)] == [("eval", 12, 0.5), ("train", 12, None)]


def test_rewind_to_zero_starts_the_log_over_and_tensorboard_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MetricsConfig(tensorboard=True)
    sinks = build_sinks(cfg, tmp_path, run="r", rank=0, local_rank=0, is_main=True)
    for step in (1, 2, 3):
        sinks.log(step, {"loss": float(step)})
    sinks.close()
    sinks = build_sinks(cfg, tmp_path, run="r", rank=0, local_rank=0, is_main=True)
    sinks.rewind(1)  # resumed from the checkpoint of step 1: steps 2 and 3 are redone
    for step in (2, 3):
        sinks.log(step, {"loss": 10.0 * step})
    sinks.close()
    assert [r["loss"] for r in _rows(tmp_path / "log.jsonl")] == [1.0, 20.0, 30.0]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    sinks = build_sinks(MetricsConfig(), tmp_path, run="r", rank=0, local_rank=0, is_main=True)
    sinks.rewind(0)  # resume=none in the same run dir: the log starts over
    sinks.close()
    assert (tmp_path / "log.jsonl").read_text() == ""
