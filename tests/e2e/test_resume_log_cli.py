"""The real CLI resuming after a crash that lost the last checkpoints."""
from __future__ import annotations

import re
import shutil

from .conftest import BASELINE, read_log, run_train


def test_resume_after_a_crash_logs_each_step_once_exactly_and_quietly(tmp_path, baseline_run, fmnist2k_shards,
                                                                      fmnist_test_shards_small):
    """A crash after step 12 that lost the checkpoints of steps 8 and 12: the resume from step 4
    redoes 5-12; log.jsonl keeps one row per step (before: 5-12 twice), bit-identical to the
    uninterrupted run, and stderr carries no third-party INFO lines (before: five per checkpoint
    from accelerate)."""
    out = tmp_path / "run"
    shutil.copytree(baseline_run, out)
    for step in (8, 12):
        shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    proc = run_train(out, fmnist2k_shards, fmnist_test_shards_small, *BASELINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(baseline_run)]
    assert [r["step"] for r in read_log(out, "eval")] == [12]
    third_party_info = [ln for ln in proc.stderr.splitlines()
                        if re.search(r" INFO (accelerate|torch|DeepSpeed|deepspeed|timm)[.:]", ln)]
    assert not third_party_info, third_party_info
    assert re.search(r" INFO dist_ssl\.engine\.checkpoint: checkpoint saved: .*step_00000008", proc.stderr)
