"""T2T-ViT and CvT on 2 CPU processes started by the real `accelerate launch` train exactly like
one process on the same global batch, under FSDP2 (accelerate, as the engine prepares it) and DDP
(tests/dist/_t2t_cvt_worker.py; one launch for both): per-step losses, final parameters and CvT's
BatchNorm statistics (global BatchNorm over the ranks)."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_t2t_cvt_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    out = tmp_path / "result.json"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch",
           "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(WORKER), "--out", str(out)]
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launch timed out\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0 and out.is_file(), f"rc={proc.returncode}\n{log.read_text()[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.timeout(600)
def test_two_processes_train_like_one_under_ddp_and_fsdp2(tmp_path):
    r = _launch(tmp_path)
    assert r["describe"] == {"distributed_type": "FSDP", "num_processes": 2, "backend": "fsdp2",
                             "mixed_precision": "no"}  # accelerate falls back silently: check
    for backend, (name, n_bn) in itertools.product(("ddp", "fsdp2"), (("t2t_vit_pico", 0), ("cvt_pico", 12))):
        res = r[f"{backend}/{name}"]  # CvT: q/k/v BatchNorms in each of its 4 blocks
        s = res["sharding"]
        assert s["global_bn"] == n_bn, s
        if backend == "ddp":
            assert s["wrapper"] == "DistributedDataParallel"
        else:
            assert s["dtensor_params"] == s["n_params"] > 0, s
        assert res["losses"] == pytest.approx(res["reference"], rel=1e-5, abs=1e-6), (backend, name, res)
        assert res["moved"] > 1e-3  # training changed the weights ...
        assert res["max_param_diff"] < 1e-5, (backend, name, res)  # ... as one process on the whole batch
        if n_bn:
            assert res["n_bn_stats"] == 2 * n_bn and res["max_bn_stat_diff"] < 1e-5, (backend, name, res)
