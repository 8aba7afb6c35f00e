"""`tools/submit.py`: validate a recipe + overrides, render its SLURM batch script into the run
directory and submit it (or print it with ``--dry-run``, which writes nothing).

``--array KEY=v1,v2`` (repeatable: the cartesian product) makes a job array, element ``i`` in
``<output_dir>/<i>/`` with ``<output_dir>/slurm/array.json`` listing each element's overrides;
``--after JOBID`` chains with ``--dependency=afterok`` (an array id waits for all its elements).
Everything reaches sbatch as an argv list and the script as quoted words (see sbatch.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from dist_ssl.cluster.sbatch import Element, JobSpec, log_dir, render
from dist_ssl.atomic import atomic_write_bytes, atomic_write_json
from dist_ssl.errors import UserError

REPO = Path(__file__).resolve().parents[2]
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
# parallel.backend -> launcher config (recipes/accelerate/), when --accelerate-config is not given
_BACKEND_CONFIG = {"auto": "ddp", "ddp": "ddp", "fsdp2": "fsdp2", "zero1": "zero1", "zero2": "zero2",
                   "zero3": "zero3"}


class SubmitError(UserError):
    """A bad argument or a failed submission: one line for the user."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit.py", description="Submit a dist_ssl training run to SLURM.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for tools/train.py")
    p.add_argument("--nodes", type=int, default=1, help="nodes (one srun task each)")
    p.add_argument("--procs-per-node", type=int, default=1, help="training processes per node (GPUs)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request per node (0: none)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs to request per node")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--job-name", help="job name (default: the run directory's name)")
    p.add_argument("--accelerate-config", help="launcher config (default: recipes/accelerate/"
                   "<parallel.backend>.yaml, ddp.yaml for auto)")
    p.add_argument("--array", action="append", default=[], metavar="KEY=v1,v2",
                   help="one array element per value (repeat: cartesian product)")
    p.add_argument("--after", action="append", default=[], metavar="JOBID",
                   help="start after this job (or whole array) succeeded")
    p.add_argument("--env-file", help="per-cluster environment sourced by the job: a path or a name "
                   "in cluster/env/ (e.g. local_cpu)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit: checkpoint + requeue (0: off)")
    p.add_argument("--max-requeues", type=int, default=3, help="preemption requeues per job")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script and the sbatch command; write nothing")
    return p


def split_values(text: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def array_overrides(specs: list[str]) -> list[tuple[str, ...]]:
    """['seed=0,1', 'lr=a,b'] -> [('seed=0', 'lr=a'), ('seed=0', 'lr=b'), ...]; [()] without arrays."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values:
            raise SubmitError(f"--array {spec!r}: expected KEY=v1,v2,...")
        axes.append([f"{key.strip()}={v}" for v in split_values(values)])
    return [tuple(combo) for combo in itertools.product(*axes)]


def resolve_env_file(value: Optional[str]) -> Optional[Path]:
    if not value:
        return None
    path = Path(value)
    if not path.is_file() and "/" not in value:
        path = REPO / "cluster" / "env" / (value if value.endswith(".sh") else value + ".sh")
    if not path.is_file():
        raise SubmitError(f"--env-file: no such file {value!r} (nor in {REPO / 'cluster' / 'env'})")
    return path.resolve()


def _load(recipe: Path, overrides: list[str]):
    from dist_ssl.config import ConfigError, load_config

    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None


def plan_elements(recipe: Path, overrides: list[str], arrays: list[str]) -> tuple[list[Element], object]:
    """Validate every element's config; pin each run directory as an absolute output_dir."""
    base = _load(recipe, overrides)
    combos = array_overrides(arrays)
    if not arrays:
        run_dir = Path(base.output_dir).resolve()
        return [Element(run_dir, (*overrides, f"output_dir={run_dir}"))], base
    parent = Path(base.output_dir).resolve()
    elements = []
    for i, combo in enumerate(combos):
        run_dir = parent / str(i)
        el_overrides = (*overrides, *combo, f"output_dir={run_dir}")
        _load(recipe, list(el_overrides))
        elements.append(Element(run_dir, el_overrides))
    return elements, base


def default_accelerate_config(backend: str) -> Path:
    """The launcher config for a ``parallel.backend``: recipes/accelerate/<backend>.yaml (ddp for auto)."""
    return REPO / "recipes" / "accelerate" / f"{_BACKEND_CONFIG[backend]}.yaml"


def accelerate_config(value: Optional[str], cfg) -> Path:
    if value:
        path = Path(value)
    else:
        path = REPO / "recipes" / "accelerate" / f"{_BACKEND_CONFIG[cfg.parallel.backend]}.yaml"
    if not path.is_file():
        raise SubmitError(f"--accelerate-config: no such file {path}")
    return path.resolve()


def build_spec(args: argparse.Namespace) -> tuple[JobSpec, Optional[Path]]:
    recipe = Path(args.recipe).resolve()
    if not recipe.is_file():
        raise SubmitError(f"recipe not found: {args.recipe}")
    for job in args.after:
        if not _JOB_ID.match(job):
            raise SubmitError(f"--after {job!r}: expected a job id like 1234 or 1234_5")
    elements, cfg = plan_elements(recipe, list(args.overrides), args.array)
    array = bool(args.array)
    top = elements[0].run_dir.parent if array else elements[0].run_dir
    script = log_dir(top) / ("array.sbatch" if array else "job.sbatch")
    env_file = resolve_env_file(args.env_file)
    spec = JobSpec(recipe=recipe, elements=tuple(elements), script_path=script, nodes=args.nodes,
                   procs_per_node=args.procs_per_node,
                   accelerate_config=accelerate_config(args.accelerate_config, cfg),
                   python=args.python, repo=REPO, workdir=Path.cwd(),
                   job_name=args.job_name or top.name, array=array, partition=args.partition,
                   time=args.time, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                   signal_seconds=args.signal_seconds, max_requeues=args.max_requeues,
                   env_file=script.parent / "env.sh" if env_file else None)
    try:
        spec.validate()
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    return spec, env_file


def sbatch_argv(spec: JobSpec, after: list[str]) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if after:
        # a failed prerequisite cancels this job instead of leaving it pending forever
        argv += ["--dependency=afterok:" + ":".join(after), "--kill-on-invalid-dep=yes"]
    return argv + [str(spec.script_path)]


def write_files(spec: JobSpec, env_file: Optional[Path], text: str) -> None:
    """Only inside the run directories: the script, the env copy, element log dirs, array.json."""
    spec.script_path.parent.mkdir(parents=True, exist_ok=True)
    for el in spec.elements:
        log_dir(el.run_dir).mkdir(parents=True, exist_ok=True)  # SLURM opens the log, never mkdirs
    if env_file is not None:
        atomic_write_bytes(spec.env_file, env_file.read_bytes())
    if spec.array:
        atomic_write_json(spec.script_path.parent / "array.json",
                          [{"index": i, "run_dir": str(el.run_dir), "overrides": list(el.overrides)}
                           for i, el in enumerate(spec.elements)])
    atomic_write_bytes(spec.script_path, text.encode("utf-8"))


def submit(argv: list[str]) -> str:
    """Run sbatch; the job id."""
    if shutil.which(argv[0]) is None:
        raise SubmitError("sbatch not found: is this a SLURM login node? (--dry-run works anywhere)")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch did not answer within 120 s") from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        spec, env_file = build_spec(args)
        try:
            text = render(spec)
        except ValueError as exc:  # e.g. a newline in an #SBATCH value
            raise SubmitError(str(exc)) from None
        command = sbatch_argv(spec, args.after)
        if args.dry_run:
            print(text, end="")
            print("# submit with:", shlex.join(command))
            return 0
        write_files(spec, env_file, text)
        job_id = submit(command)
    except SubmitError as exc:
        print(f"submit.py: error: {exc}", file=sys.stderr)
        return 2
    with open(spec.script_path.parent / "submissions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"job_id": job_id, "sbatch": command, "argv": sys.argv if argv is None else argv,
                            "cwd": os.getcwd()}) + "\n")
    print(f"submitted job {job_id}: {spec.script_path}", file=sys.stderr)
    print(job_id)
    return 0
