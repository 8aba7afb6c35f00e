"""benchmarks/gpu_check.py --smoke: the GPU check's code runs end to end at tiny sizes on the CPU.

The script is what a GPU run will execute unchanged (only the sizes, the device and inductor
instead of aot_eager differ), so every row of its table must be present with finite numbers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IDMM = {"eager fp32", "eager bf16", "compiled fp32", "compiled bf16"}
FC_KINDS = ["dense", "torch auto", "torch 1 chunk", "ours", "ours 8-row blocks", "cce"]


def test_gpu_check_smoke_prints_every_row_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["section"], r["name"]): r for r in result["rows"]}
    assert result["device_name"] == "cpu" and result["flops_per_step"] > 0
    for key, row in rows.items():  # every measured number is finite
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), (key, row)

    assert {name for sec, name in rows if sec == "idmm"} == IDMM
    for name in IDMM:
        row = rows["idmm", name]
        assert row["img_s"] > 0 and row["step_s"] > 0 and 0 < row["mfu"] < 1.5, row
    assert rows["idmm", "eager bf16"]["loss"] != rows["idmm", "eager fp32"]["loss"]  # bf16 really ran

    expected_fc = {f"{k} {p}" for k in FC_KINDS for p in ("fp32", "bf16")}
    assert {name for sec, name in rows if sec == "fc"} == expected_fc
    for name in expected_fc - {"cce fp32", "cce bf16"}:  # CCE is Triton: skipped on the CPU, said so
        row = rows["fc", name]
        assert row["fwd_bwd_s"] > 0 and row["peak_mb"] >= 0, row
        if name.endswith("fp32") or not name.startswith("torch"):  # every kind computes the dense loss;
            tol = 1e-4 if name.endswith("fp32") else 1e-2  # torch's bf16 sums its chunks' losses in bf16
            assert abs(row["loss_minus_dense_fp32"]) < tol * row["loss"], row  # (3.7 % off here): reported
    assert "needs a GPU" in rows["fc", "cce bf16"]["skipped"]

    assert rows["loader", "cpu decode"]["img_s"] > 0
    gpu = rows["loader", "gpu decode"]
    assert gpu.get("img_s", 0) > 0 or "no decode option" in gpu["skipped"]

    drift = rows["drift", "bf16 vs fp32, 3 steps"]
    assert 0 < drift["max_rel"] < 1e-2 and drift["last_rel"] <= drift["max_rel"]
    for section in ("idmm", "fc", "loader", "drift"):
        assert f"{section:>6} |" in proc.stdout  # the table is printed, not only written
