"""dist_ssl/slurm/node_launch.py under a real `accelerate launch` (2 CPU processes), without SLURM.

slurmstepd hands a forwarded USR1 to every process of the step; the launcher must turn it into
SIGTERM for the trainers only (DataLoader-worker-like grandchildren untouched) and exit with the
trainers' own code 75, recording it for the batch script.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = r"""
import json, os, signal, subprocess, sys, time
out, rank, got = sys.argv[1], os.environ["RANK"], []
for sig in (signal.SIGTERM, signal.SIGUSR1):  # handles both, like dist_ssl's PreemptionFlag
    signal.signal(sig, lambda s, f: got.append(s))
# stands in for a DataLoader worker: default dispositions, so a USR1 that reached it would kill it
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(f"{out}/ready.{rank}", "w") as f:
    json.dump({"pid": os.getpid(), "child": child.pid}, f)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
alive = child.poll() is None
child.kill()
with open(f"{out}/result.{rank}", "w") as f:
    json.dump({"signals": got, "child_alive": alive}, f)
sys.exit(75 if got else 1)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        todo += kids
    return found


def test_usr1_to_the_whole_step_becomes_sigterm_for_trainers_only(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(SLURM_NODEID="0", SLURM_NNODES="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dist_ssl.slurm.node_launch", "--status-dir", str(tmp_path), "--",
           "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           "--num_machines", "1", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        for pid in [proc.pid, *descendants(proc.pid)]:  # as slurmstepd signals a step
            os.kill(pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]
    assert (tmp_path / "node0").read_text() == "75\n"
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result == {"signals": [signal.SIGTERM], "child_alive": True}, (rank, out[-3000:])
    assert "--machine_rank 0" in out  # filled in from SLURM_NODEID


def test_one_process_runs_a_module_directly(tmp_path, monkeypatch):
    """1 node x 1 process: no launcher, ``python -m MODULE ARGS`` (the batch script's
    ``accelerate launch -m dist_ssl.engine.cli_train`` form), exit code passed through."""
    from dist_ssl.slurm.node_launch import run_accelerate

    monkeypatch.setenv("SLURM_NNODES", "1")
    (tmp_path / "exit_with.py").write_text("import sys; sys.exit(int(sys.argv[1]))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert run_accelerate(["--num_machines", "1", "--num_processes", "1", "-m", "exit_with", "7"]) == 7
