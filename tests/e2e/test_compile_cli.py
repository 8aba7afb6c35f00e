"""parallel.compile through the real `tools/train.py`: checkpoints move between compiled and eager runs.

The eager baseline run (tests/e2e/conftest.py: 12 steps, checkpoints at 4, 8, 12) is the
reference. A compiled run resumes the baseline's eager step-4 checkpoint and trains steps 5-12;
an eager run resumes the compiled run's step-8 checkpoint and trains steps 9-12. Both must
reproduce the baseline's losses: the in-place compile keeps every state-dict key, so model,
optimizer, scheduler, RNG and data position all load across. Backend aot_eager (dynamo +
AOTAutograd, the parts that touch the module and its state; inductor's kernels are checked
against eager in tests/unit/test_compile.py) keeps the graph capture to seconds.
"""
from __future__ import annotations

import json
import shutil

import pytest

from .conftest import BASELINE, read_log, run_train

COMPILE = ["parallel.compile=true", "parallel.compile_backend=aot_eager"]
RTOL = 1e-5  # aot_eager runs the eager kernels (decomposed); measured differences ~1e-7


def _resume_copy(src, step: int, out):
    """A fresh run dir holding only ``src``'s checkpoint of ``step`` (resume=auto picks it)."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, out / "checkpoints" / name)
    return out


def test_compiled_run_resumes_eager_checkpoint_and_back(tmp_path, baseline_run, fmnist2k_shards):
    reference = {r["step"]: r["loss"] for r in read_log(baseline_run)}

    compiled = _resume_copy(baseline_run, 4, tmp_path / "compiled")
    proc = run_train(compiled, fmnist2k_shards, None, *BASELINE, *COMPILE, "resume=auto", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((compiled / "run.json").read_text())
    assert cfg["total_steps"] == 12
    got = {r["step"]: r["loss"] for r in read_log(compiled)}
    assert sorted(got) == list(range(5, 13))
    assert [got[s] for s in got] == pytest.approx([reference[s] for s in got], rel=RTOL)
    assert "compiled" in proc.stderr  # the trainer logged the in-place compile

    eager = _resume_copy(compiled, 8, tmp_path / "eager")
    proc = run_train(eager, fmnist2k_shards, None, *BASELINE, "resume=auto", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["step"]: r["loss"] for r in read_log(eager)}
    assert sorted(got) == list(range(9, 13))
    assert [got[s] for s in got] == pytest.approx([reference[s] for s in got], rel=RTOL)
