"""Slow: the full Fashion-MNIST train (60k) and test (10k) splits through the real CLI."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ssl.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_full_split_workers_2_then_verify(fmnist_dir, tmp_path, split, n):
    out = tmp_path / split
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "tools/make_shards.py", "write", f"idx:{fmnist_dir}",
                        str(out), "--split", split, "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    write_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    assert m.num_samples == n and m.class_counts == [n // 10] * 10
    assert [s.num_samples for s in m.shards] == [1000] * (n // 1000)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "tools/make_shards.py", "verify", str(out),
                        "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    print(f"\n{split}: write {write_s:.1f} s ({n / write_s:.0f} images/s), "
          f"verify {time.perf_counter() - t0:.1f} s")
