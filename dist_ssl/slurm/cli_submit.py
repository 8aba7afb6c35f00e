"""`dist-ssl-submit` (tools/submit.py): submit a training run to SLURM.

    dist-ssl-submit RECIPE.yaml [key=value ...] --nodes N --procs-per-node G [--partition P]
        [--time T] [--accelerate-config FILE] [--array KEY=v1,v2 ...] [--after JOBID]
        [--env-file NAME] [--signal-seconds S] [--dry-run]

Validates the recipe + overrides, renders the batch script into the run directory and submits it
(or prints it with ``--dry-run``, which writes nothing); prints the job id. See submit.py.
Exit codes: 0 submitted (or printed); 2 a bad argument or a failed submission (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

from dist_ssl.errors import UserError, exit_with_message
from dist_ssl.slurm.sbatch import JobSpec, log_dir, render
from dist_ssl.slurm.submit import (SubmitError, accelerate_config, plan_elements, resolve_env_file,
                                   sbatch_argv, submit, write_files)

PROG = "submit.py"
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Submit a dist_ssl training run to SLURM.")
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
                   "in slurm_setup/env/ beside the recipe or here (e.g. local_cpu)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit: checkpoint + requeue (0: off)")
    p.add_argument("--max-requeues", type=int, default=3, help="preemption requeues per job")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script and the sbatch command; write nothing")
    return p


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
    env_file = resolve_env_file(args.env_file, recipe)
    spec = JobSpec(recipe=recipe, elements=tuple(elements), script_path=script, nodes=args.nodes,
                   procs_per_node=args.procs_per_node,
                   accelerate_config=accelerate_config(args.accelerate_config, cfg, recipe),
                   python=args.python, workdir=Path.cwd(),
                   job_name=args.job_name or top.name, array=array, partition=args.partition,
                   time=args.time, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                   signal_seconds=args.signal_seconds, max_requeues=args.max_requeues,
                   env_file=script.parent / "env.sh" if env_file else None)
    try:
        spec.validate()
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    return spec, env_file


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
    except UserError as exc:
        return exit_with_message(PROG, exc)
    with open(spec.script_path.parent / "submissions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"job_id": job_id, "sbatch": command, "argv": sys.argv if argv is None else argv,
                            "cwd": os.getcwd()}) + "\n")
    print(f"submitted job {job_id}: {spec.script_path}", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
