#!/usr/bin/env bash
# Set up everything dist_ssl's quickstart and tests need on a fresh machine (idempotent):
#   - a virtual environment in .venv (override with DIST_SSL_VENV) with dist_ssl[dev];
#   - the real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist where apt is
#     available, else the official download into ~/.cache/dist_ssl/fashion-mnist).
# Usage: source it (`. tools/install.sh`) to also activate the venv.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DIST_SSL_VENV:-$repo/.venv}

if [ ! -x "$venv/bin/python" ]; then
    echo "[install] creating virtual environment $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
fi
# Unpinned torch/torchvision: pip picks the newest the machine allows (see shared ENV notes).
if ! "$venv/bin/python" -c "import dist_ssl, torch, torchvision, timm, webdataset, accelerate, deepspeed, pytest" 2>/dev/null \
   || [ "$repo/pyproject.toml" -nt "$venv/.dist_ssl_installed" ]; then
    echo "[install] pip install -e '.[dev]' (first time: a few minutes)"
    "$venv/bin/pip" install -q -e "$repo[dev]"
    touch "$venv/.dist_ssl_installed"
fi

fmnist_default=/usr/share/datasets/fashion-mnist
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ ! -f "$fmnist_default/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[install] apt-get install dataset-fashion-mnist"
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        export FASHION_MNIST_DIR=${HOME}/.cache/dist_ssl/fashion-mnist
        "$venv/bin/python" -m dist_ssl.data.fashion_mnist "$FASHION_MNIST_DIR"
    fi
fi
# Opt-in (DIST_SSL_INSTALL_SLURM=1, set by .ci/run): Debian's slurm-wlm + munge for the tests in
# tests/slurm/, which start a private two-node SLURM with slurm_setup/local_slurm.sh (root only).
install_slurm() {
    [ "${DIST_SSL_INSTALL_SLURM:-0}" = 1 ] || return 0
    echo "[install] SLURM packages (slurmctld slurmd slurm-client munge) if missing"
    bash "$repo/slurm_setup/local_slurm.sh" install \
        || echo "[install] WARNING: SLURM could not be installed; the SLURM tests will skip" >&2
}
install_slurm

export PATH="$venv/bin:$PATH"
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$fmnist_default}
