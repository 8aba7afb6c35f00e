"""Faults through the real CLI: a killed trainer leaves no process behind; a rank that raises
ends a 2-process job at once, with its error printed once."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, RECIPE, FAST, read_log, train_args, train_env


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process; None when gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    state, ppid, start = fields[0], int(fields[1]), int(fields[19])
    return None if state in ("Z", "X") else (ppid, state, start)


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """{pid: (start time, command line)} of every live process below ``root``."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            parent[int(entry)] = st
    found, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, (ppid, _, start) in parent.items():
            if ppid == p and child not in found:
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    cmd = "?"
                found[child] = (start, cmd)
                frontier.append(child)
    return found


def _wait_for_rows(out: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if (out / "log.jsonl").exists() and len(read_log(out)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} log rows within {timeout}s")


def test_kill_9_of_the_trainer_leaves_no_process_behind(tmp_path, fmnist2k_shards):
    out = tmp_path / "run"
    args = train_args(out, fmnist2k_shards, None, "train.steps=400", "ckpt.every_steps=1000", "data.num_workers=2")
    proc = subprocess.Popen(args, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    survivors = {}
    try:
        _wait_for_rows(out, 2, proc)
        below = _descendants(proc.pid)
        kinds = " ".join(cmd for _, cmd in below.values())
        assert "forkserver" in kinds and "resource_tracker" in kinds and len(below) >= 4, below  # + 2 workers
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline:
            survivors = {p: cmd for p, (start, cmd) in below.items() if (st := _stat(p)) and st[2] == start}
            if not survivors:
                break
            time.sleep(0.2)
        assert not survivors, f"still alive 10 s after kill -9 of the trainer: {survivors}"
    finally:
        proc.kill()
        for p in survivors:  # never leak them into the rest of the test session
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_a_rank_that_raises_ends_the_job_at_once_with_its_error_printed_once(tmp_path, fmnist2k_shards):
    """Rank 0 raises at step 3 while rank 1 waits in the gradient all-reduce: before, rank 0's
    exception reached a barrier in Trainer.fit's finally and the job hung for the process-group
    timeout (30 min)."""
    mark = tmp_path / "failed_at"
    env = {k: v for k, v in train_env().items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(ACCELERATE_USE_CPU="true", DIST_SSL_TEST_FAIL_RANK="0", DIST_SSL_TEST_FAIL_STEP="3",
               DIST_SSL_TEST_FAIL_MARK=str(mark))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch",
           "--config_file", str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(Path(__file__).with_name("_failing_train.py")), str(RECIPE), f"output_dir={tmp_path / 'run'}",
           f"data.train={fmnist2k_shards}", "data.val=null", *FAST, "train.steps=8"]
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400  # start-up: two trainers and their loaders on a shared 2-core box
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert mark.exists(), f"rank 0 never reached step 3 (rc={proc.poll()}):\n{log.read_text()[-3000:]}"
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs 60 s after rank 0 failed:\n{log.read_text()[-3000:]}")
        took = time.time() - float(mark.read_text())
    finally:
        if proc.poll() is None:  # the trainers run in their own sessions: kill every one by pid
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    text = log.read_text()
    assert rc != 0 and took < 60, (rc, took)
    assert text.count("RuntimeError: injected failure on rank 0 at step 3") == 1, text[-4000:]
    assert text.count("[rank0] ERROR") == 1, text[-4000:]
    assert "[rank0] ERROR dist_ssl.engine.cli_train: rank 0 failed; stopping every rank" in text
    # rank 1 says in one line why it stops (unless the launcher's SIGTERM got there first)
    rank1 = [ln for ln in text.splitlines() if "[rank1] ERROR" in ln]
    assert len(rank1) <= 1 and all("rank 1: stopping: a collective with the other ranks failed" in ln
                                   for ln in rank1), rank1
