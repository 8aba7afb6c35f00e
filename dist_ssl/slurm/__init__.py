"""SLURM jobs of dist_ssl: the batch script (sbatch.py), submitting it (submit.py), the
`dist-ssl-submit` command line (cli_submit.py) and the launcher each node's srun task runs
(node_launch.py). What is particular to a site (env files, a local test SLURM) is slurm_setup/."""
