"""Sharded classifier on P = 2 and 3 gloo processes equals the dense single-process result.

One spawn per P (tests/dist/_sharded_fc_worker.py runs every case inside it): N in {7, 10, 1001}
(not divisible by 2 or 3), hard labels and CutMix, label smoothing 0 / 0.1 (the Megatron-style
local-mean smoothing would fail here), chunk None / 2 (< global batch), equal and uneven rows per
rank (at P = 3 one rank has none), with and without bias. Every rank's loss, weight-shard
gradient and feature gradient must match the dense float64 reference within 1e-5. A target >= N
on one rank makes every rank raise the same ValueError (no rank left waiting in a collective).
Equal rows declared by the caller (``equal_batches``, what training batches use) must give the
same results without the size all-gather (2 all_gathers per loss, not 3), the range check too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _sharded_fc_worker as worker  # noqa: E402

pytestmark = pytest.mark.dist
TOL = 1e-5
TIMEOUT_S = 150  # per P; ~10-25 s unloaded on 2 cores (process start dominates)


def _spawn(world: int, tmp_path: Path) -> list[dict]:
    ctx = mp.start_processes(worker.main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"P={world}: workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loss_and_grads_equal_dense(world, tmp_path):
    per_rank = _spawn(world, tmp_path)
    # a target >= N on the last rank: every rank raised the same one-line error (none hung)
    for key in ("bad_target", "bad_target_declared"):
        assert {r.pop(key) for r in per_rank} == {
            f"sharded_soft_cross_entropy: a target on rank(s) [{world - 1}] is outside [0, 10): instance/class "
            f"ids must index the N = 10 classes (check the shards against their manifest)"}, key
    n_cases = sum(1 for _ in worker.cases(world))
    assert all(len(r) == n_cases + 2 for r in per_rank)  # + the ShardedLinear module cases
    # size gather + features + targets; declared equal rows: no size gather
    gathers = {(res["case"]["equal_batches"], res["all_gathers"])
               for results in per_rank for res in results.values() if "all_gathers" in res}
    assert gathers == {(False, 3), (True, 2)}, gathers
    bad = [(rank, name, res["case"], what, e)
           for rank, results in enumerate(per_rank) for name, res in results.items()
           for what, e in res["err"].items() if not e <= TOL]
    assert not bad, "\n".join(map(str, bad[:10]))
    checked = {what for results in per_rank for res in results.values() for what in res["err"]}
    assert checked == {"loss", "features", "weight", "bias", "full_weight"}
