#!/usr/bin/env bash
# The README's main job: on a fresh machine, install, shard the real Fashion-MNIST data,
# verify the shards, train the supervised quickstart recipe with 2 processes and print the
# test accuracy. Extra arguments are recipe overrides, e.g. `bash tools/quickstart.sh train.epochs=5`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
. tools/install.sh

data=runs/data
python tools/make_shards.py write "idx:$FASHION_MNIST_DIR" "$data/fmnist2k" \
    --split train --subset per-class:204 --samples-per-shard 256 --seed 0
python tools/make_shards.py write "idx:$FASHION_MNIST_DIR" "$data/fmnist_test" \
    --split test --samples-per-shard 1000 --seed 0
python tools/make_shards.py verify "$data/fmnist2k"
python tools/make_shards.py verify "$data/fmnist_test"

# Two processes on CPU (gloo); on a GPU machine use recipes/accelerate/ddp.yaml instead.
export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
    tools/train.py recipes/supervised_fmnist2k.yaml "$@"

python - "$@" <<'PY'
import json, sys
from dist_ssl.config import load_config
cfg = load_config("recipes/supervised_fmnist2k.yaml", sys.argv[1:])
res = json.load(open(f"{cfg.output_dir}/eval.json"))
print(f"Fashion-MNIST test accuracy after {res['step']} steps on 2,040 training images: "
      f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  ({res['num_samples']} images)")
PY
