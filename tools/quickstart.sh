#!/usr/bin/env bash
# The README's main job: on a fresh machine, install, shard the real Fashion-MNIST data, verify the
# shards, then the IDMM pipeline with 2 processes (instance classifier sharded over them):
#   1. IDMM pre-training on the 2,040-image subset   (recipes/idmm_fmnist2k.yaml)
#   2. supervised fine-tuning from that backbone      (recipes/finetune_fmnist2k.yaml)
#   3. the same fine-tuning from random init          (recipes/finetune_fmnist2k_scratch.yaml)
# and print both test accuracies side by side. Extra arguments are recipe overrides applied to all
# three runs, e.g. `bash tools/quickstart.sh train.epochs=2` for a quick smoke run.
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
launch() {
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tools/train.py "$@"
}
launch recipes/idmm_fmnist2k.yaml "$@"
launch recipes/finetune_fmnist2k.yaml "$@"
launch recipes/finetune_fmnist2k_scratch.yaml "$@"

python - "$@" <<'PY'
import json, sys
from pathlib import Path
from dist_ssl.config import load_config
from dist_ssl.experiments.pixel_floor import cached_floor
from dist_ssl.experiments.spec import PixelFloor

def result(recipe):
    cfg = load_config(recipe, sys.argv[1:])
    with open(f"{cfg.output_dir}/eval.json") as f:
        return json.load(f)

idmm = result("recipes/finetune_fmnist2k.yaml")
scratch = result("recipes/finetune_fmnist2k_scratch.yaml")
print(f"Fashion-MNIST test accuracy ({idmm['num_samples']} images), fine-tuned on 2,040 training images:")
for name, res in (("IDMM pre-trained", idmm), ("random init", scratch)):
    print(f"  {name:<17} top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"({res['step']} fine-tuning steps)")
# The floor a learned representation has to beat: scikit-learn on the raw 28x28 pixels of the same
# 2,040 training images (cached in runs/pixel_floor/ with the shards' fingerprints).
floor = cached_floor(Path("runs/pixel_floor"), "fmnist2k", "runs/data/fmnist2k", "runs/data/fmnist_test",
                     PixelFloor(C=0.1, k=5))
print(f"  {'raw pixels':<17} top-1 {100 * floor['logreg_top1']:.2f}% (logistic regression), "
      f"{100 * floor['knn_top1']:.2f}% (5-NN)")
PY
