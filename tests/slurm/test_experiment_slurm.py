"""`tools/experiment.py submit` on a real SLURM (slurm_setup/local_slurm.sh, two emulated 1-CPU nodes):
a 2-cell pre-train -> fine-tune chain, one array per stage with aftercorr dependencies. Cell
"good" trains on real Fashion-MNIST shards; cell "bad" names shards that do not exist, so its
pre-training fails at run time: its own fine-tune must be cancelled and only that one, while the
good cell's fine-tune starts from the good pre-training and evaluates."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from unittest import mock

import yaml

from dist_ssl.experiments.cli_experiment import main as experiment_main

from .conftest import REPO, losses

RECIPES = REPO / "recipes"
QUICK = ["data.num_workers=0", "metrics.log_every_steps=1", "ckpt.every_steps=1000",
         "optim.warmup_epochs=null", "optim.warmup_steps=1"]


def test_two_cell_chain_failed_pretraining_cancels_only_its_finetune(slurm, tmp_path, fmnist2k_shards,
                                                                       fmnist_test_shards_small):
    slurm.idle()
    spec = {"name": "chain", "root": str(tmp_path / "root"), "seeds": [0],
            "datasets": {"good": {"train": str(fmnist2k_shards), "test": str(fmnist_test_shards_small)},
                         "bad": {"train": str(tmp_path / "no_such_shards"), "test": str(fmnist_test_shards_small)}},
            "overrides": {"all": QUICK, "pretrain": ["train.steps=3"], "finetune": ["train.steps=2"]},
            "methods": {"idmm": {"pretrain": str(RECIPES / "idmm_fmnist2k.yaml"),
                                 "finetune": str(RECIPES / "finetune_fmnist2k.yaml")}},
            "slurm": {"accelerate_config": str(RECIPES / "accelerate" / "cpu_2proc.yaml"),
                      "env_file": "local_cpu", "time": "15:00"}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with mock.patch.dict(os.environ, slurm.env()), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = experiment_main(["submit", str(path)])
    finally:
        os.chdir(here)
    assert code == 0, out.getvalue() + err.getvalue()
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "root" / "slurm").glob("*/jobs.json")]
    pre, ft = record
    assert (pre["kind"], ft["kind"], ft["after"]) == ("pretrain", "finetune", pre["job_id"])
    runs = {t["cells"][0]: Path(t["run_dir"]) for t in ft["tasks"]}
    assert [t["cells"] for t in pre["tasks"]] == [["good/idmm/seed0"], ["bad/idmm/seed0"]]
    assert slurm.jobs(ft["job_id"])[0]["Dependency"].startswith(f"aftercorr:{pre['job_id']}")

    tasks = {j["ArrayTaskId"]: j for j in slurm.wait(pre["job_id"], timeout=300)}
    assert sorted(tasks) == ["0", "1"], [(j["JobId"], j["JobState"]) for j in tasks.values()]
    logs = "\n".join(p.read_text() for p in (tmp_path / "root" / "slurm").glob("*/logs/*.out"))
    assert (tasks["0"]["JobState"], tasks["0"]["ExitCode"]) == ("COMPLETED", "0:0"), logs[-4000:]
    assert (tasks["1"]["JobState"], tasks["1"]["ExitCode"]) == ("FAILED", "2:0"), logs[-4000:]
    good_pre = tmp_path / "root" / "good" / "idmm" / "seed0" / "pretrain"
    assert sorted(losses(good_pre)) == [1, 2, 3] and (good_pre / "backbone.safetensors").is_file()

    fts = {j["ArrayTaskId"]: j for j in slurm.wait(ft["job_id"], timeout=300)}
    assert sorted(fts) == ["0", "1"], [(j["JobId"], j["JobState"], j.get("Reason")) for j in fts.values()]
    logs = "\n".join(p.read_text() for p in (tmp_path / "root" / "slurm").glob("*/logs/*.out"))
    assert (fts["0"]["JobState"], fts["0"]["ExitCode"]) == ("COMPLETED", "0:0"), logs[-4000:]
    assert (fts["1"]["JobState"], fts["1"].get("Reason")) == ("CANCELLED", "DependencyNeverSatisfied"), fts["1"]
    good_ft = runs["good/idmm/seed0"]
    assert json.loads((good_ft / "eval.json").read_text())["num_samples"] == 500
    assert f"init_from: {good_pre}\n" in (good_ft / "config.yaml").read_text()
    assert "loaded backbone" in logs and not (runs["bad/idmm/seed0"] / "config.yaml").exists()
    assert fts["0"]["StartTime"] >= tasks["0"]["EndTime"]  # ISO times sort
