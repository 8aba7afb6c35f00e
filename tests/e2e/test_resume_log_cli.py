"""The real CLI after a crash that lost the last checkpoints, and one-line errors for bad run settings."""
from __future__ import annotations

import re
import shutil

import pytest

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


@pytest.mark.parametrize("case", ["output_dir_is_a_file", "output_dir_below_a_file", "jsonl_name_escapes"])
def test_bad_run_settings_are_one_line_errors(tmp_path, fmnist2k_shards, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    out, extra, expected = {
        "output_dir_is_a_file": (a_file, [], f"output_dir: {a_file} is an existing file, not a directory; "
                                             "choose a directory path"),
        "output_dir_below_a_file": (a_file / "run", [], f"output_dir: {a_file / 'run'} is inside {a_file}, "
                                                        "an existing file, not a directory; choose a directory path"),
        "jsonl_name_escapes": (tmp_path / "run", ["metrics.jsonl_name=.."],
                               "metrics.jsonl_name: must be a plain file name inside the run dir, got '..'"),
    }[case]
    proc = run_train(out, fmnist2k_shards, None, "train.steps=1", *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: error: {expected}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "log.jsonl").exists()  # nothing written outside the run dir
