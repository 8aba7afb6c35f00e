#!/usr/bin/env python
"""Submit a training run to SLURM: `tools/submit.py RECIPE.yaml [key=value ...] --nodes N
--procs-per-node G [--partition P] [--time T] [--accelerate-config FILE] [--array KEY=v1,v2 ...]
[--after JOBID] [--env-file NAME] [--signal-seconds S] [--dry-run]`. Prints the job id.
Installed: `dist-ssl-submit` (dist_ssl/slurm/cli_submit.py)."""
import sys

from dist_ssl.slurm.cli_submit import main

if __name__ == "__main__":
    sys.exit(main())
