"""tools/submit.py against a real SLURM with two emulated 1-CPU nodes (slurm_setup/local_slurm.sh).

Real Fashion-MNIST shards, the real tools/train.py under accelerate launch (DDP on gloo across
the two "nodes"), real sbatch / srun / scontrol requeue. Every wait has a time limit.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from dist_ssl.slurm.cli_submit import main as submit_main

from .conftest import FAST, RECIPE, REPO, job_log, losses, run_info

CPU = ["--accelerate-config", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
       "--env-file", "local_cpu", "--time", "15:00"]
STEPS = 24  # long enough that a USR1 sent after step 2 lands well before the end
TWO_NODE = (f"train.steps={STEPS}", "ckpt.every_steps=1000")  # DataLoader workers on: num_workers=1
# Shell syntax in the run directory's name: it must reach sbatch, bash, srun, accelerate and
# train.py as literal text (the canary files must never appear).
EVIL = "run ; touch CANARY1 $(touch CANARY2) `touch CANARY3` 'q' \"dq\" %j"


def submit(slurm, *args: str, cwd: Path, cli: bool = False) -> str:
    """tools/submit.py; the job id. In this process unless ``cli`` (saves a torch import)."""
    if cli:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), *args], cwd=cwd,
                              env=slurm.env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip()
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with mock.patch.dict(os.environ, slurm.env()), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = submit_main(list(args))
    finally:
        os.chdir(here)
    assert code == 0, err.getvalue()[-3000:]
    return out.getvalue().strip()


def train_args(out: Path, train: Path, val, *extra: str) -> list[str]:
    return [str(RECIPE), f"output_dir={out}", f"data.train={train}",
            f"data.val={val}" if val else "data.val=null", *FAST, *extra]


def assert_done(jobs: list[dict], run_dir: Path, state: str = "COMPLETED", code: str = "0:0") -> None:
    for job in jobs:
        assert (job["JobState"], job["ExitCode"]) == (state, code), \
            f"{job['JobId']}: {job['JobState']} {job['ExitCode']}\n{job_log(run_dir)[-4000:]}"


def test_two_emulated_nodes(slurm):
    nodes = slurm.run("sinfo", "-h", "-N", "-o", "%N %t %c").split("\n")
    assert sorted(n for n in nodes if n) == ["node1 idle 1", "node2 idle 1"]


@pytest.fixture(scope="module")
def two_node_run(slurm, tmp_path_factory, fmnist2k_shards):
    """2 nodes x 1 process, uninterrupted; the run dir's name is full of shell syntax."""
    slurm.idle()
    base = tmp_path_factory.mktemp("two_node")
    out = base / EVIL
    job = submit(slurm, *train_args(out, fmnist2k_shards, None, *TWO_NODE),
                 "--nodes", "2", "--procs-per-node", "1", *CPU, cwd=base, cli=True)
    return base, out, slurm.wait(job, timeout=240)


def test_two_node_job_trains_on_both_ranks(two_node_run):
    base, out, jobs = two_node_run
    assert_done(jobs, out)
    assert jobs[0]["NodeList"] == "node[1-2]" and jobs[0]["NumNodes"] == "2"
    info = run_info(out)
    assert (info["num_processes"], info["backend"], info["global_batch"]) == (2, "ddp", 64), info
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert (out / "backbone.safetensors").is_file()
    text = job_log(out)
    for node in (0, 1):  # srun --label: one accelerate launch per node, with its machine rank
        assert f"{node}: " in text and f"--machine_rank {node} " in text, text[-3000:]
        assert (out / "slurm" / "node_exit" / f"node{node}").read_text() == "0\n"
    assert "--num_machines 2 --num_processes 2 --main_process_ip node1" in text
    assert not [p for p in base.rglob("CANARY*")] and not list(Path(REPO).glob("CANARY*"))
    submitted = json.loads((out / "slurm" / "submissions.jsonl").read_text().splitlines()[0])
    assert submitted["job_id"] == jobs[0]["JobId"]


def _rows_written(out: Path, n: int):
    def check(jobs):
        assert jobs[0]["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), jobs[0]["JobState"]
        log = out / "log.jsonl"  # complete lines only: the trainer may be mid-write
        return log.is_file() and log.read_text().count("\n") >= n
    return check


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, two_node_run, tmp_path, fmnist2k_shards):
    _, reference, ref_jobs = two_node_run
    assert_done(ref_jobs, reference)
    slurm.idle()
    out = tmp_path / "preempted"
    job = submit(slurm, *train_args(out, fmnist2k_shards, None, *TWO_NODE),
                 "--nodes", "2", "--procs-per-node", "1", *CPU, cwd=tmp_path)
    slurm.wait(job, timeout=180, until=_rows_written(out, 2))
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@s delivers
    jobs = slurm.wait(job, timeout=300)
    assert_done(jobs, out)
    text = job_log(out)
    assert jobs[0]["Restarts"] == "1", text[-4000:]
    assert "requeueing job" in text and f"job {job} attempt 1 on" in text
    stopped = [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")]
    assert any(2 <= s < STEPS for s in stopped), stopped  # the preemption checkpoint
    assert losses(out) == losses(reference)  # every step, bit for bit (gloo on CPU)
    final, expected = (load_file(d / "backbone.safetensors") for d in (out, reference))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


@pytest.fixture(scope="module")
def chains(slurm, tmp_path_factory, fmnist2k_shards, fmnist_test_shards_small):
    """Submitted together so they share the nodes: a 2-element pre-training array followed by a
    fine-tune of element 0 (--after the array), and a failing 1-node job with a dependent."""
    slurm.idle()
    base = tmp_path_factory.mktemp("chains")
    quick = ("ckpt.every_steps=1000", "data.num_workers=0")
    pre = base / "pretrain"
    array = submit(slurm, *train_args(pre, fmnist2k_shards, None, "train.steps=4", *quick),
                   "--array", "seed=0,1", *CPU, cwd=base)
    ft = submit(slurm, *train_args(base / "finetune", fmnist2k_shards, fmnist_test_shards_small,
                                   "train.steps=2", *quick, f"method.init_from={pre / '0'}"),
                "--after", array, *CPU, cwd=base)
    bad = submit(slurm, *train_args(base / "bad", base / "no_such_shards", None, "train.steps=2",
                                    *quick), cwd=base, *CPU)
    never = submit(slurm, *train_args(base / "never", fmnist2k_shards, None, "train.steps=2", *quick),
                   "--after", bad, *CPU, cwd=base)
    return base, {"array": array, "ft": ft, "bad": bad, "never": never}


def test_array_pretrain_then_dependent_finetune(slurm, chains):
    base, ids = chains
    pre, ft_out = base / "pretrain", base / "finetune"
    assert slurm.jobs(ids["ft"])[0]["Dependency"].startswith(f"afterok:{ids['array']}")
    elements = slurm.wait(ids["array"], timeout=240)
    assert sorted(e["ArrayTaskId"] for e in elements) == ["0", "1"]
    for el in elements:
        run = pre / el["ArrayTaskId"]
        assert_done([el], run)
        assert f"seed={el['ArrayTaskId']}" in (pre / "slurm" / "array.json").read_text()
        assert "seed: " + el["ArrayTaskId"] in (run / "config.yaml").read_text()
        assert run_info(run)["num_processes"] == 1 and sorted(losses(run)) == [1, 2, 3, 4]
        assert (run / "slurm" / f"slurm-{ids['array']}_{el['ArrayTaskId']}.out").is_file()
    assert losses(pre / "0") != losses(pre / "1")  # different seeds, different runs
    ft_jobs = slurm.wait(ids["ft"], timeout=180)
    assert_done(ft_jobs, ft_out)
    assert ft_jobs[0]["StartTime"] >= max(e["EndTime"] for e in elements)  # ISO times sort
    assert "loaded backbone:" in job_log(ft_out)
    assert json.loads((ft_out / "eval.json").read_text())["num_samples"] == 500


def test_failure_is_not_requeued_and_cancels_dependents(slurm, chains):
    base, ids = chains
    jobs = slurm.wait(ids["bad"], timeout=240)
    assert_done(jobs, base / "bad", state="FAILED", code="2:0")  # train.py's bad-input code
    text = job_log(base / "bad")
    assert jobs[0]["Restarts"] == "0" and "requeueing" not in text and "train.py: error:" in text
    dep = slurm.wait(ids["never"], timeout=60)[0]
    assert (dep["JobState"], dep["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), dep
