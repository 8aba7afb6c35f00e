# Template for a GPU cluster's environment, sourced by the batch script on the first node before
# `srun` (srun passes the environment on to every node). Copy it to slurm_setup/env/<cluster>.sh,
# fill in your site's modules and network, and submit with --env-file <cluster>.

# module purge
# module load cuda/12.4 nccl/2.21
# source /path/to/venv/bin/activate     # or pass --python /path/to/venv/bin/python

# NCCL: the interconnect (InfiniBand HCAs / the TCP interface between nodes)
# export NCCL_IB_HCA=mlx5
# export NCCL_SOCKET_IFNAME=ib0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# a rank that dies makes the others fail fast instead of hanging until the process-group timeout
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# CPU threads per training process (DataLoader workers are separate processes)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
