"""SLURM submission: batch-script rendering (sbatch.py) and the submit tool (submit.py)."""
