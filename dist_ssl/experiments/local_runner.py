"""`tools/experiment.py run`: execute every cell's stages on this machine, one run at a time.

- A done stage is skipped without starting anything (status.py); a stage that is not done is
  (re)launched, and the trainer's ``resume=auto`` continues from its newest checkpoint.
- A failed, invalid or stale stage fails its cell: the stages downstream of it are not run
  (independent ones are, e.g. the fine-tune after a failed k-NN evaluation), the other cells go
  on, and the summary at the end lists every failure (exit code 1).
- SIGINT / SIGTERM / SIGHUP to the runner: the running stage gets SIGTERM (the trainer finishes
  its step, checkpoints and exits 75; a second signal kills it), nothing new starts, and the
  runner exits 75: run the same command again to resume. Stages run in their own session
  (a terminal's Ctrl-C reaches only the runner, which forwards it as above) and get SIGTERM if
  the runner dies. A lock file keeps a second `run` of the same experiment out.
- Every stage prints its exact command before it starts; its output goes to
  ``<run dir>/stage.log`` (``--verbose`` also echoes it), its record to ``<run dir>/stage.json``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from dist_ssl.experiments.cells import Plan, StageRun
from dist_ssl.experiments.commands import shell_line, stage_argv, stage_env
from dist_ssl.experiments.spec import ExperimentError
from dist_ssl.experiments.status import (LOG_FILE, Resolved, artifact_stamp, read_record, resolve,
                                         state, write_record)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # as the trainer's "checkpointed, run me again"
TRAINER_REQUEUE = 75
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the runner dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def experiment_lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".runner.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentError(f"another `run` of this experiment holds {root / '.runner.lock'}") from None
        yield


class _Signals:
    """Records the first signal; forwards SIGTERM (then SIGKILL) to the running stage."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.child: Optional[subprocess.Popen] = None
        self._count = 0
        self._old = {s: signal.signal(s, self._handle) for s in _SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = self.signum or signum
        self._count += 1
        if self.child is not None and self.child.poll() is None:
            if self._count == 1:
                self.child.send_signal(signal.SIGTERM)
            else:
                self.child.kill()

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class LocalRunner:
    def __init__(self, plan: Plan, out: Optional[TextIO] = None, verbose: bool = False):
        self.plan, self.exp, self.out, self.verbose = plan, plan.experiment, out or sys.stdout, verbose
        self.outcome: dict[StageRun, tuple[str, str]] = {}  # stage -> (status, reason)
        self.failed_cells: list[tuple[str, str]] = []
        self.launched = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> int:
        t0 = time.monotonic()
        self.say(f"experiment {self.exp.name}: {len(self.plan.cells)} cells, {len(self.plan.stages)} "
                 f"stage runs, root {self.exp.root}; resolving configs ...")
        self.resolved = {s: resolve(s) for s in self.plan.stages}
        with experiment_lock(self.exp.root):
            self.signals = _Signals()
            try:
                interrupted = self._cells()
            finally:
                self.signals.restore()
        return self._summary(interrupted, time.monotonic() - t0)

    def _cells(self) -> bool:
        """Run every cell; True if interrupted. A stage that does not finish blocks the stages
        downstream of it (their upstream outcome says so), not the cell's independent ones."""
        for cell in self.plan.cells:
            problems = []
            for stage in cell.stages.values():
                if self.signals.signum is not None:
                    return True
                status, reason = self._stage(stage)
                if status == "interrupted":
                    return True
                if status != "done":
                    problems.append(f"{stage.kind} {status}: {reason}")
            if problems:
                self.failed_cells.append((cell.name, "; ".join(problems)))
        return self.signals.signum is not None

    def _stage(self, stage: StageRun) -> tuple[str, str]:
        if stage in self.outcome:  # shared with an earlier cell
            return self.outcome[stage]
        up = stage.upstream
        if up is not None and self.outcome.get(up, ("", ""))[0] != "done":
            result = ("blocked", f"not run, its {up.kind} run did not finish")
        else:
            status, reason = state(stage, self.resolved[stage], self.resolved.get(up))
            if status == "done":
                self.say(f"  skip {stage.kind:<12} {', '.join(stage.cells)}: done ({self.resolved[stage].artifact.name})")
                result = ("done", "")
            elif status in ("invalid", "stale"):
                self.say(f"  FAIL {stage.kind:<12} {stage.cells[0]}: {reason}")
                result = ("failed", reason)
            else:
                result = self._launch(stage, self.resolved[stage])
        if result[0] != "interrupted":
            self.outcome[stage] = result
        return result

    def _launch(self, stage: StageRun, resolved: Resolved) -> tuple[str, str]:
        launch = self.exp.launch_for(stage.kind)
        argv, env = stage_argv(stage, launch), stage_env(launch)
        line = shell_line(argv, env)
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        old = read_record(stage.run_dir) or {}
        attempts = old.get("attempts", []) if old.get("fingerprint") == resolved.fingerprint else []
        up = self.resolved.get(stage.upstream) if stage.upstream else None
        attempt = {"start": now()}
        record = {"experiment": str(self.exp.path), "cells": stage.cells, "stage": stage.kind,
                  "run_dir": str(stage.run_dir), "cwd": os.getcwd(), "command": argv, "command_line": line,
                  "env": env, "fingerprint": resolved.fingerprint, "config": resolved.config,
                  "upstream": str(stage.upstream.run_dir) if stage.upstream else None,
                  "upstream_stamp": artifact_stamp(up.artifact) if up else None,
                  "status": "running", "attempts": attempts + [attempt]}
        write_record(stage.run_dir, record)
        self.launched += 1
        self.say(f"  run  {stage.kind:<12} {', '.join(stage.cells)} [{len(self.outcome) + 1}/{len(self.plan.stages)}] "
                 f"(attempt {len(record['attempts'])}, {now()})\n    $ {line}")
        t0 = time.monotonic()
        rc = self._execute(argv, env, stage.run_dir / LOG_FILE, line)
        wall = time.monotonic() - t0
        if rc == 0 and resolved.artifact.is_file():
            status, reason = "done", ""
        elif self.signals.signum is not None or rc == TRAINER_REQUEUE:
            status, reason = "interrupted", f"stopped (exit code {rc}); run again to resume"
        elif rc == 0:
            status, reason = "failed", f"exited 0 without writing {resolved.artifact.name}"
        else:
            status, reason = "failed", (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")
        attempt.update(end=now(), exit_code=rc, wall_s=round(wall, 1))
        record.update(status=status, **({"finished": attempt["end"]} if status == "done" else {}))
        write_record(stage.run_dir, record)
        self.say(f"  {'done' if status == 'done' else status.upper():<4} {stage.kind:<12} in {wall:.0f} s"
                 + (f": {reason}" if reason else ""))
        if status == "failed":
            self.say(_tail(stage.run_dir / LOG_FILE, 15, indent="    | "))
        return status, reason

    def _execute(self, argv: list[str], env: dict[str, str], log: Path, line: str) -> int:
        with open(log, "ab") as fh:
            fh.write(f"==== {now()} {line}\n".encode())
            fh.flush()
            start = fh.tell()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, start_new_session=True,
                                        preexec_fn=_die_with_parent)
            except OSError as e:  # e.g. no `accelerate` executable: the stage fails, the run goes on
                fh.write(f"cannot start {argv[0]}: {e}\n".encode())
                return 127
        self.signals.child = proc
        if self.signals.signum is not None:  # signalled while starting it
            proc.send_signal(signal.SIGTERM)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if self.verbose:
                        start = _echo(log, start, self.out)
        finally:
            self.signals.child = None
        if self.verbose:
            _echo(log, start, self.out)
        return rc

    def _summary(self, interrupted: bool, wall: float) -> int:
        counts: dict[str, int] = {}
        for status, _ in self.outcome.values():
            counts[status] = counts.get(status, 0) + 1
        done = counts.get("done", 0)
        self.say(f"experiment {self.exp.name}: {done}/{len(self.plan.stages)} stage runs done "
                 f"({self.launched} launched now), {len(self.failed_cells)} cell(s) failed, {wall:.0f} s")
        for name, reason in self.failed_cells:
            self.say(f"  FAILED {name}: {reason}")
        if interrupted:
            self.say(f"interrupted by signal {self.signals.signum}: run the same command again to resume")
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed_cells else 0


def _echo(log: Path, start: int, out: TextIO) -> int:
    with open(log, "rb") as fh:
        fh.seek(start)
        data = fh.read()
    if data:
        out.write(data.decode("utf-8", "replace"))
        out.flush()
    return start + len(data)


def _tail(path: Path, lines: int, indent: str) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"{indent}(no log at {path})"
    return "\n".join(indent + ln for ln in text[-lines:]) + f"\n{indent}(log: {path})"


def print_plan(plan: Plan, out: Optional[TextIO] = None) -> int:
    """`run --dry-run`: every cell's stages, their state and exact commands; starts nothing.
    Exit code 2 if a stage is invalid or stale (it would fail), else 0."""
    exp, out = plan.experiment, out or sys.stdout
    resolved = {s: resolve(s) for s in plan.stages}
    print(f"# experiment {exp.name}: {len(plan.cells)} cells, {len(plan.stages)} stage runs; root {exp.root}; "
          f"commands run in {os.getcwd()}", file=out)
    shown, bad = set(), 0
    for cell in plan.cells:
        print(f"\n## {cell.name}", file=out)
        for stage in cell.stages.values():
            if stage in shown:
                print(f"[{stage.kind}] shared with {stage.cells[0]}: {stage.run_dir}", file=out)
                continue
            shown.add(stage)
            status, reason = state(stage, resolved[stage], resolved.get(stage.upstream))
            bad += status in ("invalid", "stale")
            print(f"[{stage.kind}] {status}" + (f": {reason}" if reason else ""), file=out)
            launch = exp.launch_for(stage.kind)
            print(shell_line(stage_argv(stage, launch), stage_env(launch)), file=out)
    return 2 if bad else 0
