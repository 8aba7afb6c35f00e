"""`submit` without SLURM: which job arrays an experiment becomes (one per stage kind, task ids
matching the upstream's for aftercorr, rounds where one run feeds several, done runs left out),
and the rendered scripts (`--dry-run`): per-task recipes and overrides, dependencies, syntax,
and an evaluation script run by bash with a stub python. The real chain on a real SLURM is in
tests/slurm/test_experiment_slurm.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path


from dist_ssl.experiments.cells import build_plan
from dist_ssl.experiments.cli_experiment import main as experiment_main
from dist_ssl.experiments.slurm_submit import plan_arrays, todo_runs
from dist_ssl.experiments.status import resolve
from test_experiment_runner import fake_done  # tests/unit is on sys.path (pytest's prepend import)
from test_experiment_spec import RECIPES, REPO, base_spec, load, write


def _jobs(plan, todo=None):
    return [(j.kind, [r.cells[0] for r in j.runs], j.indices, j.after.number if j.after else None)
            for j in plan_arrays(todo if todo is not None else plan.stages)]


def _spec(tmp_path, seeds=(0, 1)):
    spec = base_spec(tmp_path)
    spec["seeds"] = list(seeds)
    spec["datasets"] = {"a": spec["datasets"]["a"]}
    return spec


def test_one_array_per_stage_kind_with_matching_task_ids(tmp_path):
    plan = build_plan(load(tmp_path, _spec(tmp_path)))
    assert _jobs(plan) == [
        ("pretrain", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], None),
        ("finetune", ["a/scratch/seed0", "a/scratch/seed1"], [0, 1], None),  # random init: no dependency
        ("finetune", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], 0),  # task i after pre-training task i
        ("eval", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], 0),
    ]


def test_a_shared_pretraining_feeds_several_arrays_in_rounds(tmp_path):
    spec = base_spec(tmp_path)
    spec["pretrain_data"] = {"big": str(tmp_path / "big")}
    for ds in spec["datasets"].values():
        ds["pretrain_on"] = "big"
    del spec["methods"]["scratch"]
    plan = build_plan(load(tmp_path, spec))
    assert _jobs(plan) == [
        ("pretrain", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], None),  # one per seed, for both data sets
        ("finetune", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], 0),
        ("finetune", ["b/idmm/seed0", "b/idmm/seed1"], [0, 1], 0),
        ("eval", ["a/idmm/seed0", "a/idmm/seed1"], [0, 1], 0),
        ("eval", ["b/idmm/seed0", "b/idmm/seed1"], [0, 1], 0),
    ]


def test_task_ids_follow_the_upstream_array_sparse(tmp_path):
    spec = _spec(tmp_path, seeds=(0,))
    spec["methods"] = {"idmm": {"pretrain": str(RECIPES / "idmm_fmnist2k.yaml"),
                                "finetune": str(RECIPES / "finetune_fmnist2k.yaml")},
                       "simclr": {"pretrain": str(RECIPES / "simclr_fmnist2k.yaml"), "eval": True}}
    plan = build_plan(load(tmp_path, spec))
    assert _jobs(plan) == [("pretrain", ["a/idmm/seed0", "a/simclr/seed0"], [0, 1], None),
                           ("finetune", ["a/idmm/seed0"], [0], 0),
                           ("eval", ["a/simclr/seed0"], [1], 0)]  # SimCLR's pre-training is task 1


def test_done_runs_are_not_submitted(tmp_path):
    plan = build_plan(load(tmp_path, _spec(tmp_path)))
    pre0 = plan.cells[0].stages["pretrain"]
    fake_done(pre0, resolve(pre0))
    resolved = {s: resolve(s) for s in plan.stages}
    todo, problems = todo_runs(plan, resolved, io.StringIO())
    assert problems == [] and pre0 not in todo
    assert _jobs(plan, todo) == [
        ("pretrain", ["a/idmm/seed1"], [0], None),
        ("finetune", ["a/idmm/seed0", "a/scratch/seed0", "a/scratch/seed1"], [0, 1, 2], None),  # upstream done
        ("finetune", ["a/idmm/seed1"], [0], 0),
        ("eval", ["a/idmm/seed0"], [0], None),
        ("eval", ["a/idmm/seed1"], [0], 0),
    ]


def _dry_run(exp_file: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = experiment_main(["submit", str(exp_file), "--dry-run", *args])
    return code, out.getvalue(), err.getvalue()


def _scripts(text: str) -> dict[str, str]:
    """label -> script text, from the dry-run output."""
    parts = re.split(r"^# ---- (\S+) \(\d+ task\(s\)\)$", text, flags=re.M)
    return {Path(parts[i]).stem: parts[i + 1] for i in range(1, len(parts), 2)}


def _case_values(script: str, var: str) -> dict[str, list[str]]:
    """array index -> the words of VAR=(...) (or VAR=word) in the script's case statement."""
    out, index = {}, None
    for line in script.splitlines():
        if m := re.match(r"^    (\d+)\)$", line):
            index = m.group(1)
        elif index is not None and line.strip().startswith(f"{var}="):
            value = line.strip()[len(var) + 1:]
            out[index] = shlex.split(value[1:-1] if value.startswith("(") else value)
    return out


def test_dry_run_renders_arrays_with_aftercorr(tmp_path):
    spec = _spec(tmp_path)
    spec["methods"]["simclr"] = {"pretrain": str(RECIPES / "simclr_fmnist2k.yaml"),
                                 "finetune": str(RECIPES / "finetune_fmnist2k.yaml")}
    spec["slurm"] = {"time": "2:00:00", "stages": {"pretrain": {"nodes": 2, "procs_per_node": 4}}}
    exp_file = write(tmp_path, spec)
    code, out, err = _dry_run(exp_file, "--partition", "gpu", "--gpus-per-node", "4", "--env-file", "example_gpu")
    assert code == 0, err
    scripts = _scripts(out)
    assert list(scripts) == ["00-pretrain", "01-finetune", "02-finetune", "03-eval"]
    plan = build_plan(load(tmp_path, spec))
    cells = {c.name: c for c in plan.cells}
    pre = scripts["00-pretrain"]
    sub_dir = re.search(r"^#SBATCH --output=(\S+)/logs/00-pretrain-%A_%a.out$", pre, flags=re.M).group(1)
    assert Path(sub_dir).parent == tmp_path / "root" / "slurm"
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2:00:00", "#SBATCH --array=0-3", f"#SBATCH --chdir={os.getcwd()}"):
        assert line in pre.splitlines(), line
    assert '--num_processes "$((SLURM_NNODES * 4))"' in pre and '-m dist_ssl.engine.cli_train "$RECIPE" "${OVERRIDES[@]}" &' in pre
    # task i = pre-training run i, each with its own recipe and exact overrides
    order = ["a/idmm/seed0", "a/simclr/seed0", "a/idmm/seed1", "a/simclr/seed1"]
    recipes, overrides = _case_values(pre, "RECIPE"), _case_values(pre, "OVERRIDES")
    for i, name in enumerate(order):
        run = cells[name].stages["pretrain"]
        assert recipes[str(i)] == [str(run.recipe)] and overrides[str(i)] == list(run.args)
    assert "simclr_fmnist2k.yaml" in recipes["1"][0] and "idmm_fmnist2k.yaml" in recipes["0"][0]
    ft = scripts["02-finetune"]
    assert "#SBATCH --nodes=1" in ft.splitlines() and "#SBATCH --array=0-3" in ft.splitlines()
    for i, name in enumerate(order):
        assert f"method.init_from={cells[name].stages['pretrain'].run_dir}" in _case_values(ft, "OVERRIDES")[str(i)]
    assert "# submit with: sbatch --parsable --dependency=aftercorr:$JOB_00 --kill-on-invalid-dep=yes" in out
    assert out.count("--dependency=aftercorr:$JOB_00") == 2  # fine-tunes and evals, not the random-init array
    ev = scripts["03-eval"]
    assert "#SBATCH --array=0,2" in ev.splitlines()  # IDMM's pre-trainings are tasks 0 and 2
    assert _case_values(ev, "ARGS")["2"] == list(cells["a/idmm/seed1"].stages["eval"].args)
    for name, text in scripts.items():
        proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert proc.returncode == 0, (name, proc.stderr)
    assert not (tmp_path / "root").exists()  # a dry run writes nothing


def test_eval_script_runs_the_task_with_literal_arguments(tmp_path):
    """bash runs the rendered evaluation array for task 1 with a stub python that records argv."""
    spec = _spec(tmp_path)
    spec["datasets"]["a"]["test"] = str(tmp_path / "it's a $(touch CANARY) test")
    exp_file = write(tmp_path, spec)
    stub = tmp_path / "python"
    record = tmp_path / "argv.json"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    code, out, err = _dry_run(exp_file, "--python", str(stub))
    assert code == 0, err
    script = _scripts(out)["03-eval"]
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="42"))
    assert proc.returncode == 0, proc.stderr
    run = build_plan(load(tmp_path, spec)).cells[2].stages["eval"]  # a/idmm/seed1
    assert json.loads(record.read_text()) == ["-m", "dist_ssl.eval.cli_eval", *run.args]
    assert run.run_dir.is_dir() and not list(tmp_path.rglob("CANARY"))


def test_submit_refuses_a_broken_experiment(tmp_path):
    spec = _spec(tmp_path)
    spec["slurm"] = {"nodes": 0}
    code, out, err = _dry_run(write(tmp_path, spec))
    assert code == 2 and err.strip() == "experiment.py: error: exp.yaml: slurm.nodes: must be >= 1, got 0"
