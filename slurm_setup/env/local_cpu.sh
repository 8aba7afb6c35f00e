# Environment of the emulated two-node CPU cluster (slurm_setup/local_slurm.sh), sourced by the
# batch script before launching. Also a starting point for any CPU-only SLURM cluster.
# Use with: tools/submit.py ... --env-file local_cpu --accelerate-config recipes/accelerate/cpu_2proc.yaml

# accelerate: run on CPU with gloo although the launcher config says MULTI_GPU (see that file)
export ACCELERATE_USE_CPU=true
# each emulated node has 1 CPU: one compute thread per process
export OMP_NUM_THREADS=1
# every emulated node is this host: gloo talks over loopback
export GLOO_SOCKET_IFNAME=lo
export PYTHONUNBUFFERED=1
