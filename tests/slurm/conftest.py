"""A real SLURM (Debian slurm-wlm) with two emulated nodes for the cluster tests.

``slurm`` (session): installs the packages if they are missing (the only reason to skip is that
this fails), runs ``slurm_setup/local_slurm.sh up`` with a private state dir and ports, and stops it
at the end of the session: the finalizer closes the script's stdin, and the script's EXIT trap
stops exactly the daemons it started -- also when pytest dies, since its stdin then closes.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from e2e.conftest import FAST, RECIPE, read_log  # noqa: E402,F401  (re-exported for the tests)

LOCAL_SLURM = REPO / "slurm_setup" / "local_slurm.sh"
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel",
                  "munged", "munge")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _have_slurm() -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return all(shutil.which(c, path=path) for c in SLURM_COMMANDS)


def _ensure_installed() -> None:
    if _have_slurm():
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM packages (slurmctld slurmd slurm-client munge) are not installed and "
                    "cannot be installed without root")
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "install"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 or not _have_slurm():
        pytest.skip("SLURM packages (slurmctld slurmd slurm-client munge) cannot be installed here: "
                    + (proc.stderr.strip().splitlines() or ["apt-get failed"])[-1])


@dataclass
class Slurm:
    conf: Path
    state: Path

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.conf), DIST_SSL_PROGRESS="0", OMP_NUM_THREADS="1")
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts (an array id gives one per element)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines()
                if line.strip()]

    def wait(self, job_id: str, timeout: float, until=None) -> list[dict]:
        """Poll until every element is terminal (or ``until(jobs)``); fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if until(jobs) if until else all(j["JobState"] in TERMINAL for j in jobs):
                return jobs
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not done within {timeout:.0f}s: "
                             f"{[(j['JobId'], j['JobState'], j.get('Reason')) for j in jobs]}")

    def idle(self, timeout: float = 60) -> None:
        """Cancel leftover jobs and wait until both nodes are idle again."""
        left = self.run("squeue", "-h", "-o", "%i").split()
        if left:
            self.run("scancel", *left, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t").split()
            if not self.run("squeue", "-h", "-o", "%i").split() and states.count("idle") == 2:
                return
            time.sleep(0.5)
        raise AssertionError(f"nodes not idle within {timeout}s: {states}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    _ensure_installed()
    state = Path(tempfile.mkdtemp(prefix="dist_ssl-slurm-", dir="/tmp"))
    log = open(state.with_name(state.name + ".log"), "w+")
    proc = subprocess.Popen(["bash", str(LOCAL_SLURM), "up"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, LOCAL_SLURM_DIR=str(state), LOCAL_SLURM_TIMEOUT="60"))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY SLURM_CONF="):
            log.seek(0)
            raise AssertionError(f"local SLURM did not start: {line!r}\n{log.read()[-3000:]}")
        yield Slurm(conf=Path(line.strip().split("=", 1)[1]), state=state)
    finally:
        proc.stdin.close()  # local_slurm.sh up: stdin closed -> stop the daemons it started
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["bash", str(LOCAL_SLURM), "stop"], timeout=120,
                           env=dict(os.environ, LOCAL_SLURM_DIR=str(state)))
        log.close()
        # daemon logs outlive the state dir, for failures: <pytest tmp>/slurm_logs*/
        if (state / "log").is_dir():
            shutil.copytree(state / "log", tmp_path_factory.mktemp("slurm_logs"), dirs_exist_ok=True)
        shutil.rmtree(state, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)


def job_log(run_dir: Path) -> str:
    """All SLURM logs of a run directory (every attempt is appended to one file per job)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("slurm-*.out")))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir)}


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())
