"""`tools/experiment.py run` and `report` for real: tiny grids of the real recipes on real
Fashion-MNIST shards, every stage a real `tools/train.py` / `tools/eval.py` process.

- a grid with a pre-train -> k-NN eval + fine-tune chain and a cell whose pre-training fails at
  run time: the failure is reported, its fine-tune never starts, the other cell finishes, the
  exit code is 1; run again: the finished stages start nothing, the failed one is retried;
  `report` reads the recorded numbers;
- a stage interrupted through the runner (SIGTERM: the trainer checkpoints, exit 75) resumes from
  its checkpoint on the next `run` and ends with every step trained exactly once.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_ssl.experiments.cli_experiment import main as experiment_main

from .conftest import REPO, read_log, train_env

RECIPES = REPO / "recipes"
QUICK = ["data.num_workers=0", "metrics.log_every_steps=1", "optim.warmup_epochs=null", "optim.warmup_steps=1"]


def experiment(tmp: Path, train: Path, test: Path, methods: dict, **extra) -> Path:
    spec = {"name": "e2e", "root": str(tmp / "root"), "seeds": [0],
            "datasets": {"fm": {"train": str(train), "test": str(test)}},
            "overrides": {"all": QUICK, "pretrain": ["train.steps=3", "model.drop_path=0.0"],
                          "finetune": ["train.steps=2"]},
            "methods": methods, "report": {"pixel_floor": False}, **extra}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (no second torch import); its stages are real subprocesses."""
    out, err = io.StringIO(), io.StringIO()
    env = {k: v for k, v in train_env().items() if not k.startswith("ACCELERATE_")}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.MonkeyPatch.context() as mp:
        for k in set(os.environ) - set(env):
            mp.delenv(k)
        for k, v in env.items():
            mp.setenv(k, v)
        code = experiment_main(list(args))
    return code, out.getvalue(), err.getvalue()


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "stage.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory, fmnist2k_shards, fmnist_test_shards_small):
    tmp = tmp_path_factory.mktemp("experiment")
    idmm = {"pretrain": {"recipe": str(RECIPES / "idmm_fmnist2k.yaml"), "chance_line": "2*ln(N)"},
            "finetune": str(RECIPES / "finetune_fmnist2k.yaml"),
            "eval": {"methods": ["knn"], "args": ["--img-size", "28", "--workers", "0"]}}
    broken = {"pretrain": {"recipe": str(RECIPES / "idmm_fmnist2k.yaml"),
                           "overrides": [f"data.train={tmp / 'no_such_shards'}"]},  # fails at run time
              "finetune": str(RECIPES / "finetune_fmnist2k.yaml")}
    # the failing cell comes first: the runner must go on past it
    path = experiment(tmp, fmnist2k_shards, fmnist_test_shards_small, {"broken": broken, "idmm": idmm})
    code, out, err = run_cli("run", str(path))
    return path, tmp / "root" / "fm", code, out, err


def test_failed_cell_is_reported_and_the_others_finish(grid):
    path, root, code, out, err = grid
    assert code == 1, out + err
    pre, ev, ft = (root / "idmm" / "seed0" / s for s in ("pretrain", "eval", "finetune"))
    assert (pre / "backbone.safetensors").is_file() and sorted(r["step"] for r in read_log(pre)) == [1, 2, 3]
    assert json.loads((ft / "eval.json").read_text())["num_samples"] == 500
    assert "loaded backbone" in (ft / "stage.log").read_text()  # fine-tuned from the pre-training run
    assert json.loads((ev / "eval_probe.json").read_text())["backbone"] == str(pre / "backbone.safetensors")
    for run in (pre, ev, ft):
        rec = record(run)
        assert rec["status"] == "done" and [a["exit_code"] for a in rec["attempts"]] == [0], rec
        assert rec["command_line"] in out  # printed before it ran
    bad = record(root / "broken" / "seed0" / "pretrain")
    assert bad["status"] == "failed" and [a["exit_code"] for a in bad["attempts"]] == [2]  # train.py: bad input
    assert not (root / "broken" / "seed0" / "finetune").exists()  # never started
    assert "FAILED fm/broken/seed0: pretrain failed: exit code 2; finetune blocked" in out
    assert "train.py: error:" in out and "no_such_shards" in out  # the log's tail, printed
    assert "3/5 stage runs done (4 launched now), 1 cell(s) failed" in out


def test_second_run_starts_only_what_is_not_done(grid):
    path, root, *_ = grid
    done = [root / "idmm" / "seed0" / s for s in ("pretrain", "eval", "finetune")]
    before = {d: (d / "stage.json").read_bytes() for d in done}
    mtimes = {d: (d / "log.jsonl").stat().st_mtime_ns for d in done if (d / "log.jsonl").exists()}
    code, out, err = run_cli("run", str(path))
    assert code == 1, out + err
    assert all((d / "stage.json").read_bytes() == before[d] for d in done)
    assert all((d / "log.jsonl").stat().st_mtime_ns == m for d, m in mtimes.items())
    assert out.count("  skip ") == 3 and "(1 launched now)" in out
    assert [a["exit_code"] for a in record(root / "broken" / "seed0" / "pretrain")["attempts"]] == [2, 2]


def test_report_reads_the_recorded_results(grid):
    path, root, *_ = grid
    code, out, err = run_cli("report", str(path))
    assert code == 0, err
    report = root.parent / "report" / "e2e"
    rows = {(r["metric"], r["row"]): r for r in csv.DictReader(io.StringIO((report / "results.csv").read_text()))}
    ft = json.loads((root / "idmm" / "seed0" / "finetune" / "eval.json").read_text())["top1"]
    knn = json.loads((root / "idmm" / "seed0" / "eval" / "eval_probe.json").read_text())["knn_top1"]
    assert float(rows[("finetune", "idmm")]["mean"]) == 100 * ft
    assert float(rows[("knn", "idmm")]["mean"]) == 100 * knn
    assert rows[("finetune", "broken")]["n"] == "0"
    assert rows[("finetune", "broken")]["missing"] == "0:pretrain failed (exit code 2)"
    md = (report / "results.md").read_text()
    assert "| broken | missing (0/1) |" in md and f"| idmm | {100 * ft:.2f} (n=1) |" in md
    assert md.index("| broken |") < md.index("| idmm |")  # rows in the file's order, none dropped
    assert (report / "finetune.png").is_file() and (report / "curves" / "fm__idmm__seed0.png").is_file()


def _rows(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return log.read_text().count("\n") if log.is_file() else 0


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path, fmnist2k_shards, fmnist_test_shards_small):
    steps = 60
    sup = {"finetune": {"recipe": str(RECIPES / "finetune_fmnist2k.yaml"),
                        "overrides": [f"train.steps={steps}", "ckpt.every_steps=1000", "train.batch_size=16"]}}
    path = experiment(tmp_path, fmnist2k_shards, fmnist_test_shards_small, {"sup": sup})
    run = tmp_path / "root" / "fm" / "sup" / "seed0" / "finetune"
    env = {k: v for k, v in train_env().items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "experiment.py"), "run", str(path)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _rows(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)  # to the runner, which forwards it to the trainer
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]
    assert "interrupted by signal 15: run the same command again to resume" in out
    first = record(run)
    assert first["status"] == "interrupted" and [a["exit_code"] for a in first["attempts"]] == [75]
    (ckpt,) = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")]
    assert 3 <= ckpt < steps and not (run / "eval.json").exists()
    code, out, err = run_cli("run", str(path))
    assert code == 0, out + err
    assert f"resumed from {run / 'checkpoints' / f'step_{ckpt:08d}'} at step {ckpt}" in (run / "stage.log").read_text()
    logged = [r["step"] for r in read_log(run)]
    assert sorted(set(logged)) == list(range(1, steps + 1)) and len(logged) == steps  # each step once
    final = record(run)
    assert final["status"] == "done" and [a["exit_code"] for a in final["attempts"]] == [75, 0]
    assert math.isfinite(json.loads((run / "eval.json").read_text())["top1"])
