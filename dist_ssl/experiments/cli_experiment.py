"""`dist-ssl-experiment run|submit|report EXPERIMENT.yaml` (also ``tools/experiment.py``): see the
package docstring and README.

Exit codes: 0 done; 1 some cell failed (listed at the end); 2 bad experiment file or
arguments (one line); 75 interrupted (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from dist_ssl.errors import UserError, run_command

PROG = "experiment.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run, submit or report a dist_ssl experiment "
                                "(a grid of recipe chains declared in a YAML file).")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("experiment", help="experiment YAML (recipes/experiments/*.yaml)")
    common.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="only cells whose name matches (fnmatch, e.g. 'flowers/idmm*/seed0'); repeatable")
    run = sub.add_parser("run", parents=[common], help="run every cell here, one stage at a time")
    run.add_argument("--dry-run", action="store_true", help="print each stage's state and command; run nothing")
    run.add_argument("-v", "--verbose", action="store_true", help="echo each stage's output")
    rep = sub.add_parser("report", parents=[common], help="tables (Markdown, CSV) and plots from the run dirs")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    s = sub.add_parser("submit", parents=[common], help="one SLURM job array per stage, chained per task")
    s.add_argument("--dry-run", action="store_true", help="print the batch scripts and sbatch commands")
    s.add_argument("--nodes", type=int, help="nodes per training run (default: the file's slurm: block, or 1)")
    s.add_argument("--procs-per-node", type=int, help="training processes per node (GPUs)")
    s.add_argument("--gpus-per-node", type=int, help="GPUs to request per node")
    s.add_argument("--cpus-per-node", type=int, help="CPUs to request per node")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--time", help="time limit per job, e.g. 24:00:00")
    s.add_argument("--accelerate-config", help="launcher config (default: from parallel.backend)")
    s.add_argument("--env-file", help="per-cluster environment: a path or a name in slurm_setup/env/")
    s.add_argument("--signal-seconds", type=int, help="USR1 this long before the time limit (0: off)")
    s.add_argument("--max-requeues", type=int, help="preemption requeues per job")
    s.add_argument("--python", help="python on the compute nodes (default: this one)")
    return p


_SLURM_OPTS = ("nodes", "procs_per_node", "gpus_per_node", "cpus_per_node", "partition", "time",
               "accelerate_config", "env_file", "signal_seconds", "max_requeues")


def _dispatch(args: argparse.Namespace) -> int:
    from dist_ssl.experiments.cells import build_plan
    from dist_ssl.experiments.parse import load_experiment

    plan = build_plan(load_experiment(args.experiment), args.only or None)
    if args.command == "run":
        from dist_ssl.experiments.local_runner import LocalRunner, print_plan

        return print_plan(plan) if args.dry_run else LocalRunner(plan, verbose=args.verbose).run()
    if args.command == "submit":
        from dist_ssl.experiments.slurm_submit import submit_plan

        cli = {k: getattr(args, k) for k in _SLURM_OPTS}
        cli["python"] = args.python
        return submit_plan(plan, cli, args.dry_run)
    from dist_ssl.experiments.report import write_report

    out = write_report(plan, out=sys.stdout, plots=not args.no_plots)
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}" + ("" if args.no_plots else " and PNG plots"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, _dispatch, args, level=logging.WARNING, errors=(UserError,))


if __name__ == "__main__":
    sys.exit(main())
