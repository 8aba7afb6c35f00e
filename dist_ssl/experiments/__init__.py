"""Experiments as data: a YAML file names recipes, a grid (methods x datasets x variants x seeds)
and the chain of stages of every cell; `tools/experiment.py` runs it locally (local_runner.py),
submits it to SLURM (slurm_submit.py) and builds the results tables and plots (report.py).

spec.py parses and validates the file, cells.py expands it into cells and stage run directories,
status.py decides whether a stage is done; every stage is an ordinary `tools/train.py` (or
`tools/eval.py`) run that can be repeated by hand with its printed command.
"""
