"""The rendered batch script without SLURM: `--dry-run` text, and the script itself run by bash
with stub `srun` / `scontrol` / python that record what they were given (requeue decisions,
signal forwarding, literal arguments)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ssl.slurm.sbatch import Element, JobSpec, render, sbatch_value
from dist_ssl.slurm.cli_submit import main as submit_main
from dist_ssl.slurm.submit import array_overrides, split_values

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "supervised_fmnist2k.yaml"
# only ever parsed (shlex), never run: the executed tests use harmless canaries instead
NASTY = ["data.train=x; rm -rf /", "method.init_from=$(rm -rf /)", "output_dir=`id` 'q' \"dq\" \\ #c",
         "a.b=line1\nline2)\nrm -rf /", "seed=*"]


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """tools/submit.py --dry-run, in this process (no second torch import): exit code + output."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = submit_main([str(RECIPE), *args, "--dry-run"])
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_dry_run_4_nodes_x_8_gpus_deepspeed(tmp_path):
    out = tmp_path / "ds"
    proc = dry_run(tmp_path, f"output_dir={out}", "parallel.backend=zero3", "train.epochs=100",
                   "--nodes", "4", "--procs-per-node", "8", "--gpus-per-node", "8",
                   "--partition", "gpu", "--time", "24:00:00", "--env-file", "example_gpu",
                   "--signal-seconds", "600")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=ds", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
                      f"#SBATCH --chdir={tmp_path}", f"#SBATCH --output={out}/slurm/slurm-%j.out",
                      "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600"]
    start = lines.index(next(ln for ln in lines if ln.startswith("srun ")))
    assert lines[start:start + 8] == [
        'srun --kill-on-bad-exit=1 --label --nodes="$SLURM_NNODES" --ntasks-per-node=1 \\',
        '    "$PYTHON" -m dist_ssl.slurm.node_launch --status-dir "$STATUS_DIR" -- \\',
        f"    --config_file {REPO}/recipes/accelerate/zero3.yaml \\",  # from parallel.backend
        '    --num_machines "$SLURM_NNODES" \\',
        '    --num_processes "$((SLURM_NNODES * 8))" \\',
        '    --main_process_ip "$MAIN_ADDR" \\',
        '    --main_process_port "$MAIN_PORT" \\',
        f'    -m dist_ssl.engine.cli_train {RECIPE} "${{OVERRIDES[@]}}" &']
    assert 'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert any(ln.startswith("MAIN_PORT=$((20000 + SLURM_JOB_ID % 10000))") for ln in lines)
    assert f"OVERRIDES=(output_dir={out} parallel.backend=zero3 train.epochs=100 output_dir={out})" in lines
    assert f"set +u; source {out}/slurm/env.sh || exit 1; set -u" in lines
    assert lines[-1] == f"# submit with: sbatch --parsable {out}/slurm/job.sbatch"
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_array_and_after(tmp_path):
    proc = dry_run(tmp_path, f"output_dir={tmp_path / 'sweep'}", "--array", "seed=0,1",
                   "--array", "method.crop_scale=[0.2,1.0],[0.5,1.0]", "--after", "17", "--after", "18_1")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "#SBATCH --array=0-3" in text
    assert f"#SBATCH --output={tmp_path}/sweep/%a/slurm/slurm-%A_%a.out" in text
    assert f"RUN_DIR={tmp_path}/sweep/3" in text
    assert f"OVERRIDES=(output_dir={tmp_path}/sweep seed=1 'method.crop_scale=[0.5,1.0]' " \
           f"output_dir={tmp_path}/sweep/3)" in text
    assert "--dependency=afterok:17:18_1 --kill-on-invalid-dep=yes" in text.splitlines()[-1]


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = dry_run(tmp_path, "train.epoch=3")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("submit.py: error: train.epoch")
    proc = dry_run(tmp_path, "--after", "12;rm")
    assert proc.returncode == 2 and "--after" in proc.stderr
    proc = dry_run(tmp_path, "--env-file", "no_such_cluster")
    assert proc.returncode == 2 and "no_such_cluster" in proc.stderr


def test_array_values_split_outside_brackets():
    assert split_values("a,[1,2],{x: 1, y: 2},b") == ["a", "[1,2]", "{x: 1, y: 2}", "b"]
    assert array_overrides(["s=0,1", "t=a,b"]) == [("s=0", "t=a"), ("s=0", "t=b"), ("s=1", "t=a"),
                                                   ("s=1", "t=b")]


def test_sbatch_values_quoted_for_sbatchs_parser():
    assert sbatch_value("24:00:00") == "24:00:00"
    assert sbatch_value('a b#c"d\\e') == '"a b#c\\"d\\\\e"'
    with pytest.raises(ValueError):
        sbatch_value("a\nb")


def spec(tmp_path: Path, overrides=(), nodes: int = 2, max_requeues: int = 3) -> JobSpec:
    run = tmp_path / "run"
    return JobSpec(recipe=RECIPE, elements=(Element(run, (*overrides, f"output_dir={run}")),),
                   script_path=run / "slurm" / "job.sbatch", nodes=nodes, procs_per_node=2,
                   accelerate_config=REPO / "recipes" / "accelerate" / "ddp.yaml",
                   python=str(tmp_path / "bin" / "fakepython"), workdir=tmp_path,
                   job_name="t", max_requeues=max_requeues)


def overrides_in(text: str) -> list[str]:
    """The words of the script's OVERRIDES=(...) as a POSIX shell parses them (never executed)."""
    lex = shlex.shlex(text[text.index("OVERRIDES=("):], posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = []
    for token in lex:
        if token == ")":
            return words[2:]  # after "OVERRIDES=" and "("
        words.append(token)
    raise AssertionError("unterminated OVERRIDES array")


def test_nasty_overrides_render_as_single_literal_words(tmp_path):
    text = render(spec(tmp_path, NASTY))
    assert overrides_in(text) == NASTY + [f"output_dir={tmp_path / 'run'}"]


# ----------------------------------------------------------------------------- run by bash
STUB_SRUN = r"""#!/bin/bash
# srun stand-in: skip options, run the command once per node (SLURM_NODEID=k), forward USR1
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((k = 0; k < SLURM_NNODES; k++)); do SLURM_NODEID=$k "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for p in "${pids[@]}"; do
    while :; do wait "$p"; c=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$c" -gt "$rc" ] && rc=$c
done
exit "${STUB_SRUN_RC:-$rc}"
"""
STUB_SCONTROL = r"""#!/bin/bash
# scontrol stand-in: `show hostnames` lists node1..nodeN; everything else is recorded
if [ "$1 $2" = "show hostnames" ]; then for ((k = 1; k <= SLURM_NNODES; k++)); do echo "node$k"; done
else echo "$*" >> "$STUB_DIR/scontrol.log"; fi
"""
STUB_PYTHON = r"""#!/usr/bin/env python3
# node_launch stand-in: records its argv, writes the node's status file, exits with the
# node's code from STUB_CODES ("75,-" = node0 75, node1 writes no status and exits 143)
import json, os, signal, sys
node = int(os.environ["SLURM_NODEID"])
out = os.environ["STUB_DIR"]
if os.environ.get("STUB_WAIT_USR1"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
with open(f"{out}/argv.{node}.json", "w") as f:
    json.dump(sys.argv[1:], f)
if os.environ.get("STUB_WAIT_USR1"):
    signal.sigtimedwait({signal.SIGUSR1}, 60)
    code = "75"
else:
    codes = os.environ.get("STUB_CODES", "").split(",")
    code = codes[node] if node < len(codes) and codes[node] else "0"
status = sys.argv[sys.argv.index("--status-dir") + 1]
if code != "-":
    with open(f"{status}/node{node}", "w") as f:
        f.write(code + "\n")
sys.exit(143 if code == "-" else int(code))
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("fakepython", STUB_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def script_env(tmp_path: Path, nodes: int, restart: int = 0, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", STUB_DIR=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"node[1-{nodes}]",
               SLURM_RESTART_COUNT=str(restart), **extra)
    return env


def write_script(tmp_path: Path, job: JobSpec) -> Path:
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render(job))
    return job.script_path


def test_every_node_gets_the_launch_line_with_literal_arguments(stubs):
    canary = stubs / "canary"
    canary.mkdir()
    literal = [f"data.train=x; rm -rf {canary}; touch {stubs}/pwned1",
               f"method.init_from=$(rm -rf {canary}) `touch {stubs}/pwned2` 'q' \"dq\" \\ #c *"]
    job = spec(stubs, literal, nodes=4)
    proc = subprocess.run(["bash", str(write_script(stubs, job))], env=script_env(stubs, 4),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert canary.is_dir() and not list(stubs.glob("pwned*"))
    for node in range(4):
        argv = json.loads((stubs / f"argv.{node}.json").read_text())
        assert argv == ["-m", "dist_ssl.slurm.node_launch", "--status-dir",
                        str(stubs / "run" / "slurm" / "node_exit"), "--",
                        "--config_file", str(REPO / "recipes" / "accelerate" / "ddp.yaml"),
                        "--num_machines", "4", "--num_processes", "8",
                        "--main_process_ip", "node1", "--main_process_port", str(20000 + 4242 % 10000),
                        "-m", "dist_ssl.engine.cli_train", str(RECIPE), *literal,
                        f"output_dir={stubs / 'run'}"]
    assert not (stubs / "scontrol.log").exists()  # success: no requeue


@pytest.mark.parametrize("codes, srun_rc, restart, exit_code, requeued", [
    ("75,75", None, 0, 0, True),      # preempted and checkpointed: requeue
    ("75,-", "143", 0, 0, True),      # srun killed the slower node: the status files decide
    ("75,75", None, 3, 75, False),    # 3 requeues used up: stop, report 75
    ("2,-", "143", 0, 2, False),      # a real failure is never requeued; the trainer's code wins
    ("0,0", None, 0, 0, False),
])
def test_requeue_decision(stubs, codes, srun_rc, restart, exit_code, requeued):
    extra = {"STUB_CODES": codes, **({"STUB_SRUN_RC": srun_rc} if srun_rc else {})}
    proc = subprocess.run(["bash", str(write_script(stubs, spec(stubs, nodes=2)))],
                          env=script_env(stubs, 2, restart, **extra), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == exit_code, proc.stdout + proc.stderr
    log = stubs / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else "")


def test_usr1_to_the_batch_shell_reaches_the_launchers_and_requeues(stubs):
    script = write_script(stubs, spec(stubs, nodes=2))
    proc = subprocess.Popen(["bash", str(script)], env=script_env(stubs, 2, STUB_WAIT_USR1="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((stubs / f"argv.{k}.json").exists() for k in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "launchers did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what `scancel --batch --signal=USR1` does
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "USR1: asking the trainers to checkpoint" in out and "requeueing job 4242" in out
    assert (stubs / "scontrol.log").read_text() == "requeue 4242\n"


def test_short_names_are_found_beside_the_recipe_or_in_the_working_directory(tmp_path):
    """An installed package has no checkout around it: ``--env-file NAME`` and the default
    launcher config come from the recipe's folder or one above it, else from the cwd."""
    project = tmp_path / "project"
    (project / "recipes" / "accelerate").mkdir(parents=True)
    (project / "recipes" / "accelerate" / "ddp.yaml").write_text("distributed_type: MULTI_GPU\n")
    recipe = project / "recipes" / "mine.yaml"
    recipe.write_text(RECIPE.read_text())
    (tmp_path / "slurm_setup" / "env").mkdir(parents=True)  # the cwd's, not the recipe's
    (tmp_path / "slurm_setup" / "env" / "here.sh").write_text("export HERE=1\n")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = submit_main([str(recipe), f"output_dir={tmp_path / 'run'}", "--env-file", "here", "--dry-run"])
            missing = submit_main([str(recipe), "--env-file", "example_gpu", "--dry-run"])  # only in the repo
    finally:
        os.chdir(cwd)
    assert code == 0, err.getvalue()
    assert f"    --config_file {project}/recipes/accelerate/ddp.yaml \\" in out.getvalue().splitlines()
    assert missing == 2 and "submit.py: error: --env-file: no such file 'example_gpu'" in err.getvalue()
