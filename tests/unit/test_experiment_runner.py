"""The local runner's decisions without training anything: when a stage is done, to do or stale
(status.py), that done stages start no process, and that an invalid stage fails its cell, blocks
only what is downstream of it and makes the exit code non-zero. The real runs (launch, failure
at run time, SIGTERM + resume) are in tests/e2e/test_experiment_cli.py."""
from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
import yaml

from dist_ssl.experiments import local_runner
from dist_ssl.experiments.cells import build_plan
from dist_ssl.experiments.local_runner import LocalRunner
from dist_ssl.experiments.status import artifact_stamp, read_record, resolve, state, write_record

from test_experiment_spec import base_spec, load  # tests/unit is on sys.path (rootdir-less "prepend" import)


@pytest.fixture
def plan(tmp_path):
    spec = base_spec(tmp_path)
    spec["seeds"] = [0]
    spec["datasets"] = {"a": spec["datasets"]["a"]}
    return build_plan(load(tmp_path, spec))


def fake_done(stage, resolved, upstream=None) -> None:
    """What a finished run leaves that the runner looks at: its result file and its record."""
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    resolved.artifact.write_text("{}")
    write_record(stage.run_dir, {"fingerprint": resolved.fingerprint, "config": resolved.config, "status": "done",
                                 "upstream_stamp": artifact_stamp(upstream.artifact) if upstream else None})


def test_done_todo_stale_invalid(plan):
    pre, ev, ft = plan.cells[0].stages.values()
    r_pre, r_ev, r_ft = resolve(pre), resolve(ev), resolve(ft)
    # what "done" means: eval.json when the run has data.val, else the exported backbone
    assert r_pre.artifact == pre.run_dir / "backbone.safetensors"
    assert r_ft.artifact == ft.run_dir / "eval.json"
    assert r_ev.artifact == ev.run_dir / "eval_probe.json"
    assert state(pre, r_pre, None) == ("todo", "")
    fake_done(pre, r_pre)
    assert state(pre, r_pre, None) == ("done", "")
    # another config (the experiment or a recipe changed): done work is stale, never reused
    record = read_record(pre.run_dir)
    write_record(pre.run_dir, {**record, "fingerprint": "old", "config": record["config"].replace(
        "steps: 3", "steps: 30")})
    status, reason = state(pre, r_pre, None)
    assert status == "stale" and "changed: train.steps" in reason and str(pre.run_dir) in reason
    # a key that dist_ssl added since the run (a new field at its default) is not another config,
    # a key the run had that is gone now is
    cfg = yaml.safe_load(record["config"])
    del cfg["train"]["steps"]
    write_record(pre.run_dir, {**record, "fingerprint": "old", "config": yaml.safe_dump(cfg, sort_keys=False)})
    assert state(pre, r_pre, None) == ("done", "")
    cfg = yaml.safe_load(record["config"])
    cfg["train"]["no_longer_a_key"] = 1
    write_record(pre.run_dir, {**record, "fingerprint": "old", "config": yaml.safe_dump(cfg, sort_keys=False)})
    assert state(pre, r_pre, None)[0] == "stale"
    write_record(pre.run_dir, {**record, "fingerprint": "old", "config": record["config"].replace(
        "steps: 3", "steps: 30")})
    # ... also when only a checkpoint exists; with no progress at all it is simply relaunched
    r_pre.artifact.unlink()
    assert state(pre, r_pre, None)[0] == "todo"
    (pre.run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert state(pre, r_pre, None)[0] == "stale"
    # a fine-tune made from an earlier result of its pre-training is stale once that re-ran
    (pre.run_dir / "checkpoints" / "step_00000002").rmdir()
    fake_done(pre, r_pre)
    fake_done(ft, r_ft, upstream=r_pre)
    assert state(ft, r_ft, r_pre) == ("done", "")
    stamp = r_pre.artifact.stat().st_mtime_ns
    os.utime(r_pre.artifact, ns=(stamp + 10**9, stamp + 10**9))
    status, reason = state(ft, r_ft, r_pre)
    assert status == "stale" and "re-ran since" in reason
    # a config error is train.py's own one line
    bad = build_plan(plan.experiment).cells[0].stages["pretrain"]
    bad.args = bad.args[:-1] + ("method.nope=1",) + bad.args[-1:]
    status, reason = state(bad, resolve(bad), None)
    assert status == "invalid" and reason.startswith("train.py: error: method.nope: unknown key"), reason


def _no_process(*args, **kwargs):
    raise AssertionError(f"a process was started: {args[0] if args else kwargs}")


def test_done_stages_start_no_process(plan, monkeypatch):
    resolved = {s: resolve(s) for s in plan.stages}
    for s in plan.stages:
        fake_done(s, resolved[s], resolved.get(s.upstream))
    before = {s: (s.run_dir / "stage.json").read_bytes() for s in plan.stages}
    monkeypatch.setattr(local_runner.subprocess, "Popen", _no_process)
    out = io.StringIO()
    runner = LocalRunner(plan, out=out)
    assert runner.run() == 0, out.getvalue()
    assert runner.launched == 0
    assert out.getvalue().count("  skip ") == len(plan.stages) == 4
    assert all((s.run_dir / "stage.json").read_bytes() == before[s] for s in plan.stages)  # untouched


def test_invalid_stage_fails_its_cell_blocks_downstream_only(tmp_path, monkeypatch):
    spec = base_spec(tmp_path)
    spec["seeds"] = [0]
    spec["datasets"] = {"a": spec["datasets"]["a"]}
    spec["methods"]["idmm"]["pretrain"]["overrides"] = ["method.nope=1"]
    plan = build_plan(load(tmp_path, spec))
    scratch = plan.cells[1].stages["finetune"]
    fake_done(scratch, resolve(scratch))
    monkeypatch.setattr(local_runner.subprocess, "Popen", _no_process)
    out = io.StringIO()
    runner = LocalRunner(plan, out=out)
    assert runner.run() == local_runner.EXIT_FAILED
    text = out.getvalue()
    assert "FAILED a/idmm/seed0: pretrain failed: train.py: error: method.nope: unknown key" in text, text
    assert "eval blocked: not run, its pretrain run did not finish" in text
    assert "finetune blocked: not run, its pretrain run did not finish" in text
    assert "FAILED a/scratch" not in text and "1 cell(s) failed" in text
    assert runner.outcome[scratch] == ("done", "")


def test_second_runner_is_locked_out(plan):
    with local_runner.experiment_lock(plan.experiment.root):
        with pytest.raises(Exception, match="another `run` of this experiment holds"):
            LocalRunner(plan, out=io.StringIO()).run()


def test_record_of_a_launch(plan, monkeypatch, tmp_path):
    """A stage's record: command, cwd, env, config, upstream stamp, one attempt with its exit code
    (a stub command stands in for train.py: it writes the result file and exits 0)."""
    pre = plan.cells[0].stages["pretrain"]
    resolved = resolve(pre)
    script = f"import pathlib; pathlib.Path({str(resolved.artifact)!r}).write_text('x'); print('trained')"
    monkeypatch.setattr(local_runner, "stage_argv", lambda stage, launch: ["python", "-c", script])
    runner = LocalRunner(plan, out=io.StringIO())
    runner.resolved = {pre: resolved}
    runner.signals = local_runner._Signals()
    try:
        assert runner._launch(pre, resolved) == ("done", "")
    finally:
        runner.signals.restore()
    record = json.loads((pre.run_dir / "stage.json").read_text())
    assert record["status"] == "done" and record["command"] == ["python", "-c", script]
    assert record["cwd"] == os.getcwd() and record["fingerprint"] == resolved.fingerprint
    (attempt,) = record["attempts"]
    assert attempt["exit_code"] == 0 and attempt["wall_s"] >= 0 and attempt["start"] <= attempt["end"]
    assert "trained" in (pre.run_dir / "stage.log").read_text()
    assert subprocess.run(["true"]).returncode == 0  # the real Popen is untouched here


def test_a_command_that_cannot_start_fails_its_stage(plan, monkeypatch):
    pre = plan.cells[0].stages["pretrain"]
    monkeypatch.setattr(local_runner, "stage_argv", lambda stage, launch: ["/no/such/accelerate", "launch"])
    runner = LocalRunner(plan, out=io.StringIO())
    runner.resolved = {pre: resolve(pre)}
    runner.signals = local_runner._Signals()
    try:
        assert runner._launch(pre, runner.resolved[pre]) == ("failed", "exit code 127")
    finally:
        runner.signals.restore()
    assert "cannot start /no/such/accelerate" in (pre.run_dir / "stage.log").read_text()
    assert read_record(pre.run_dir)["status"] == "failed"
