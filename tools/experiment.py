#!/usr/bin/env python
"""Experiments: `tools/experiment.py run|submit|report EXPERIMENT.yaml [--dry-run] [--only PATTERN]
[SLURM options for submit]`. Installed: `dist-ssl-experiment`.
See README ("Experiments") and recipes/experiments/."""
import sys

from dist_ssl.experiments.cli_experiment import main

if __name__ == "__main__":
    sys.exit(main())
