"""`tools/experiment.py submit`: the experiment's stage runs as SLURM job arrays with per-task
dependencies, rendered through dist_ssl/slurm/ (training) and here (evaluations).

One array per stage kind (array task = one stage run). A downstream array depends on its
upstream array with ``--dependency=aftercorr:<id> --kill-on-invalid-dep=yes``: task i starts
when task i of the upstream array completed successfully, and is cancelled when it failed, so a
failed pre-training cancels only its own fine-tunes. Task ids are therefore the upstream's ids
(sparse lists like ``--array=0,3``). Where one run feeds several (a pre-training shared by the
fine-tunes on seven data sets), the downstream runs are split into rounds, one array each, so
every task still has exactly one corresponding upstream task. Runs already done are not
submitted; a downstream run of a done one has no dependency.

Files: ``<root>/slurm/<submission>/NN-<kind>.sbatch``, logs in ``.../logs/NN-<kind>-<job>_<task>.out``,
``jobs.json`` (job ids, tasks -> run dirs, dependencies; rewritten after each sbatch).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from dist_ssl.atomic import atomic_write_bytes, atomic_write_json
from dist_ssl.entry_points import EVAL_MODULE
from dist_ssl.experiments.cells import Plan, StageRun
from dist_ssl.experiments.spec import STAGES, ExperimentError, Slurm
from dist_ssl.experiments.status import Resolved, resolve, state
from dist_ssl.slurm.sbatch import Element, JobSpec, render, sbatch_value, slurm_filename
from dist_ssl.slurm.submit import SubmitError, default_accelerate_config, resolve_env_file, submit

RENDERED_BY = "dist-ssl-experiment submit"


@dataclass(eq=False)
class ArrayJob:
    number: int
    kind: str
    runs: list[StageRun]
    indices: list[int]
    after: Optional["ArrayJob"] = None
    script: Optional[Path] = None
    text: str = ""
    job_id: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.number:02d}-{self.kind}"


def plan_arrays(todo: list[StageRun]) -> list[ArrayJob]:
    """Arrays in submission order (upstream first); see the module docstring."""
    placed: dict[StageRun, tuple[ArrayJob, int]] = {}
    jobs: list[ArrayJob] = []

    def add(kind: str, items: list[tuple[int, StageRun]], after: Optional[ArrayJob]) -> None:
        job = ArrayJob(len(jobs), kind, [r for _, r in items], [i for i, _ in items], after)
        jobs.append(job)
        placed.update({r: (job, i) for i, r in items})

    for kind in STAGES:  # upstream kinds come first (eval evaluates a training stage)
        runs = [r for r in todo if r.kind == kind]
        free = [r for r in runs if r.upstream not in placed]
        if free:
            add(kind, list(enumerate(free)), None)
        by_parent: dict[ArrayJob, list[StageRun]] = {}
        for r in runs:
            if r.upstream in placed:
                by_parent.setdefault(placed[r.upstream][0], []).append(r)
        for parent, members in by_parent.items():
            rounds: list[list[tuple[int, StageRun]]] = []
            seen: Counter = Counter()
            for r in members:
                index = placed[r.upstream][1]
                if seen[index] == len(rounds):
                    rounds.append([])
                rounds[seen[index]].append((index, r))
                seen[index] += 1
            for items in rounds:
                add(kind, items, parent)
    return jobs


def todo_runs(plan: Plan, resolved: dict[StageRun, Resolved], out: TextIO) -> tuple[list[StageRun], list[str]]:
    """Runs to submit (not done, upstream done or submitted too) and the problems (invalid/stale
    runs, and what they block)."""
    todo, problems, blocked = [], [], set()
    for run in plan.stages:
        if run.upstream in blocked:
            blocked.add(run)
            problems.append(f"{run.cells[0]}: {run.kind} not submitted: its {run.upstream.kind} run cannot run")
            continue
        status, reason = state(run, resolved[run], resolved.get(run.upstream))
        if status == "done":
            print(f"  skip {run.kind:<12} {', '.join(run.cells)}: done", file=out)
        elif status == "todo":
            todo.append(run)
        else:
            blocked.add(run)
            problems.append(f"{run.cells[0]}: {run.kind}: {reason}")
    return todo, problems


def _accelerate_config(slurm: Slurm, job: ArrayJob, resolved: dict) -> Path:
    if slurm.accelerate_config:
        path = Path(slurm.accelerate_config)
    else:
        backends = {resolved[r].backend for r in job.runs}
        if len(backends) > 1:
            raise ExperimentError(f"{job.kind} runs use several parallel.backend values {sorted(backends)}: "
                                  "set slurm.accelerate_config (or per stage under slurm.stages)")
        path = default_accelerate_config(backends.pop(), job.runs[0].recipe)
    if not path.is_file():
        raise ExperimentError(f"slurm accelerate config not found: {path}")
    return path.resolve()


def render_train(job: ArrayJob, slurm: Slurm, ctx: "Context") -> str:
    spec = JobSpec(recipe=job.runs[0].recipe,
                   elements=tuple(Element(r.run_dir, r.args, recipe=r.recipe) for r in job.runs),
                   script_path=job.script, nodes=slurm.nodes, procs_per_node=slurm.procs_per_node,
                   accelerate_config=_accelerate_config(slurm, job, ctx.resolved), python=ctx.python,
                   workdir=ctx.workdir, job_name=f"{ctx.name}.{job.label}", array=True,
                   partition=slurm.partition, time=slurm.time, gpus_per_node=slurm.gpus_per_node,
                   cpus_per_node=slurm.cpus_per_node, signal_seconds=slurm.signal_seconds,
                   max_requeues=slurm.max_requeues, env_file=ctx.env_copy(slurm),
                   array_indices=tuple(job.indices), output=ctx.output(job), rendered_by=RENDERED_BY)
    return render(spec)


def render_eval(job: ArrayJob, slurm: Slurm, ctx: "Context") -> str:
    """An array of `dist-ssl-eval` runs, one node and one task each (no preemption handling:
    an evaluation is short and simply re-submitted)."""
    q = shlex.quote
    opts = [("job-name", f"{ctx.name}.{job.label}"), ("nodes", 1), ("ntasks", 1)]
    opts += [("gpus-per-node", slurm.gpus_per_node)] if slurm.gpus_per_node else []
    opts += [("cpus-per-task", slurm.cpus_per_node)] if slurm.cpus_per_node else []
    opts += [(k, v) for k, v in (("partition", slurm.partition), ("time", slurm.time)) if v]
    opts += [("chdir", ctx.workdir), ("output", ctx.output(job)), ("open-mode", "append"),
             ("array", ",".join(map(str, job.indices)))]
    lines = ["#!/bin/bash", f"# dist_ssl frozen-feature evaluations rendered by {RENDERED_BY}; "
             "resubmit with `sbatch` on this file."]
    lines += [f"#SBATCH --{k}={sbatch_value(v)}" for k, v in opts]
    lines += ["", "set -uo pipefail", f"PYTHON={q(ctx.python)}", 'case "${SLURM_ARRAY_TASK_ID:-}" in']
    for i, r in zip(job.indices, job.runs):
        lines += [f"    {i})", f"        RUN_DIR={q(str(r.run_dir))}",
                  f"        ARGS=({' '.join(q(a) for a in r.args)})", "        ;;"]
    lines += ["    *) echo \"[dist_ssl] unknown array index '${SLURM_ARRAY_TASK_ID:-}'\" >&2; exit 2 ;;", "esac"]
    env = ctx.env_copy(slurm)
    if env is not None:
        lines.append(f"set +u; source {q(str(env))} || exit 1; set -u")
    lines += ['echo "[dist_ssl] eval task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_JOB_ID} on $(hostname): $(date -Is)"',
              'mkdir -p "$RUN_DIR" || exit 1',
              f'"$PYTHON" -m {EVAL_MODULE} "${{ARGS[@]}}"', "rc=$?",
              'echo "[dist_ssl] exit code $rc: $(date -Is)"', 'exit "$rc"']
    return "\n".join(lines) + "\n"


def sbatch_argv(job: ArrayJob) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if job.after is not None:
        dep = job.after.job_id or f"$JOB_{job.after.number:02d}"
        argv += [f"--dependency=aftercorr:{dep}", "--kill-on-invalid-dep=yes"]
    return argv + [str(job.script)]


@dataclass
class Context:
    name: str
    sub_dir: Path
    workdir: Path
    python: str
    resolved: dict
    anchors: tuple  # the experiment file and its recipes: short --env-file names are found beside them
    env_files: dict = field(default_factory=dict)  # source path -> copy in sub_dir

    def output(self, job: ArrayJob) -> str:
        return slurm_filename(self.sub_dir / "logs", f"{job.label}-%A_%a.out")

    def env_copy(self, slurm: Slurm) -> Optional[Path]:
        if not slurm.env_file:
            return None
        try:
            source = resolve_env_file(slurm.env_file, *self.anchors)
        except SubmitError as e:
            raise ExperimentError(str(e)) from None
        return self.env_files.setdefault(source, self.sub_dir / f"env{len(self.env_files)}.sh")


def _queued_jobs(root: Path) -> list[str]:
    """Array job ids of earlier submissions of this experiment still in the queue."""
    import json

    ids = set()
    for path in root.glob("slurm/*/jobs.json"):
        try:
            ids.update(str(j["job_id"]) for j in json.loads(path.read_text()) if j.get("job_id"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not ids:
        return []
    proc = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=60, check=False)
    return sorted(ids & set(proc.stdout.split())) if proc.returncode == 0 else []


def submit_plan(plan: Plan, cli: dict, dry_run: bool, out: Optional[TextIO] = None) -> int:
    exp, out = plan.experiment, out or sys.stdout
    resolved = {s: resolve(s) for s in plan.stages}
    todo, problems = todo_runs(plan, resolved, out)
    for p in problems:
        print(f"  FAIL {p}", file=out)
    jobs = plan_arrays(todo)
    if not jobs:
        print(f"experiment {exp.name}: nothing to submit", file=out)
        return 1 if problems else 0
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sub_dir = exp.root / "slurm" / stamp
    n = 1
    while sub_dir.exists():
        n += 1
        sub_dir = exp.root / "slurm" / f"{stamp}-{n}"
    ctx = Context(exp.name, sub_dir, Path.cwd(), cli.pop("python", None) or sys.executable, resolved,
                  (exp.path, *(s.recipe for s in plan.stages if s.recipe is not None)))
    for job in jobs:
        slurm = dataclasses.replace(exp.slurm_for(job.kind), **{k: v for k, v in cli.items() if v is not None})
        job.script = sub_dir / f"{job.label}.sbatch"
        job.text = render_eval(job, slurm, ctx) if job.kind == "eval" else render_train(job, slurm, ctx)
    if dry_run:
        for job in jobs:
            print(f"\n# ---- {job.script} ({len(job.runs)} task(s))", file=out)
            print(job.text, end="", file=out)
            print("# submit with:", " ".join(shlex.quote(a) if not a.startswith("--dependency") else a
                                             for a in sbatch_argv(job)), file=out)
        return 0
    return _submit_jobs(exp, ctx, jobs, out, 1 if problems else 0)


def _submit_jobs(exp, ctx: Context, jobs: list[ArrayJob], out: TextIO, code: int) -> int:
    queued = _queued_jobs(exp.root)
    if queued:
        raise ExperimentError(f"jobs of an earlier submit of {exp.name} are still queued ({', '.join(queued)}): "
                              "wait for them, or scancel them first")
    (ctx.sub_dir / "logs").mkdir(parents=True)
    for source, copy in ctx.env_files.items():
        atomic_write_bytes(copy, source.read_bytes())
    record = []
    for job in jobs:
        atomic_write_bytes(job.script, job.text.encode("utf-8"))
        for r in job.runs:
            r.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            job.job_id = submit(sbatch_argv(job))
        except SubmitError as e:
            raise ExperimentError(f"{job.script.name}: {e}") from None
        record.append({"label": job.label, "kind": job.kind, "job_id": job.job_id, "script": str(job.script),
                       "after": job.after.job_id if job.after else None,
                       "tasks": [{"index": i, "run_dir": str(r.run_dir), "cells": r.cells}
                                 for i, r in zip(job.indices, job.runs)]})
        atomic_write_json(ctx.sub_dir / "jobs.json", record)
        after = f" after {job.after.job_id} (aftercorr)" if job.after else ""
        print(f"submitted {job.label}: job {job.job_id}, tasks {','.join(map(str, job.indices))}{after}", file=out)
    print(f"experiment {exp.name}: {len(jobs)} array job(s); record {ctx.sub_dir / 'jobs.json'}", file=out)
    return code
