"""Properties of the per-epoch stream plan (pure function, no I/O)."""
import itertools
import math
from collections import Counter

import numpy as np
import pytest

from dist_ssl.data.stream_plan import (
    buffer_permutation, plan_epoch, plan_eval, worker_batches)


def _ids(plan, sizes, rank=None):
    """Instance ids read by the plan, per stream position (shard k holds contiguous ids)."""
    first = np.cumsum([0] + list(sizes))
    out = []
    ranks = range(len(plan.streams)) if rank is None else [rank]
    for r in ranks:
        for stream in plan.streams[r]:
            for rg in stream:
                out.extend(range(first[rg.shard] + rg.start, first[rg.shard] + rg.start + rg.count))
    return out


def _combos():
    rng = np.random.default_rng(0)
    shard_sets = [[5], [7, 3], [256] * 7 + [248], [1, 1, 1], [100, 37, 64, 1], [3] * 13]
    shard_sets += [list(rng.integers(1, 60, size=int(rng.integers(1, 9)))) for _ in range(6)]
    for sizes, r, w, b in itertools.product(shard_sets, [1, 2, 3, 4], [0, 1, 2, 3], [1, 4, 16]):
        yield [int(s) for s in sizes], r, w, b


@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_properties(drop_last):
    checked = 0
    for sizes, r, w, b in _combos():
        n = sum(sizes)
        if drop_last and n < r * b:
            with pytest.raises(ValueError):
                plan_epoch(sizes, r, w, b, seed=0, epoch=0, drop_last=True)
            continue
        plan = plan_epoch(sizes, r, w, b, seed=3, epoch=1, drop_last=drop_last)
        nb = n // (r * b) if drop_last else math.ceil(n / (r * b))
        assert plan.batches_per_rank == [nb] * r  # equal batch counts per rank
        for rank in range(r):
            for wk, stream in enumerate(plan.streams[rank]):
                # stream length = its round-robin share of the rank's batches, all full
                assert plan.stream_batches[rank][wk] == worker_batches(nb, max(1, w), wk)
                assert sum(rg.count for rg in stream) == plan.stream_batches[rank][wk] * b
                for rg in stream:  # ranges stay inside their shard
                    assert 0 <= rg.start and rg.start + rg.count <= sizes[rg.shard]
        counts = Counter(_ids(plan, sizes))
        assert sum(counts.values()) == nb * r * b
        if drop_last:
            assert max(counts.values()) == 1 and n - len(counts) < r * b
        else:
            assert set(counts) == set(range(n))  # every id covered
            # fewest repeats: T - N extra samples spread as evenly as possible
            assert max(counts.values()) - min(counts.values()) <= 1
            assert sum(counts.values()) - n < r * b
        checked += 1
    assert checked > 100


def test_rep_marks_padding_repeats():
    sizes, r, b = [10, 3], 2, 4  # N=13 -> 2 batches x 2 ranks x 4 = 16: 3 repeats
    plan = plan_epoch(sizes, r, 2, b, seed=0, epoch=0)
    reps = Counter()
    for rank in plan.streams:
        for stream in rank:
            for rg in stream:
                reps[rg.rep] += rg.count
    assert reps == {0: 13, 1: 3}


def test_deterministic_and_epoch_dependent():
    sizes = [256] * 7 + [248]
    a = plan_epoch(sizes, 2, 2, 32, seed=0, epoch=0)
    assert a == plan_epoch(sizes, 2, 2, 32, seed=0, epoch=0)
    assert _ids(a, sizes) != _ids(plan_epoch(sizes, 2, 2, 32, seed=0, epoch=1), sizes)
    assert _ids(a, sizes) != _ids(plan_epoch(sizes, 2, 2, 32, seed=1, epoch=0), sizes)
    # ranks get different samples in different epochs (not a fixed partition)
    r0 = [set(_ids(plan_epoch(sizes, 2, 2, 32, 0, e), sizes, rank=0)) for e in range(2)]
    assert r0[0] != r0[1]


def test_fewer_shards_than_streams_no_empty_stream():
    plan = plan_epoch([50, 30], 2, 3, 4, seed=0, epoch=0)  # 2 shards, 6 streams
    nb = math.ceil(80 / 8)
    for rank in plan.streams:
        for wk, stream in enumerate(rank):
            assert sum(rg.count for rg in stream) == worker_batches(nb, 3, wk) * 4 > 0


def test_eval_plan_exactly_once_in_order():
    for sizes, r, w, b in _combos():
        plan = plan_eval(sizes, r, w, b)
        n = sum(sizes)
        got = []
        for rank in range(r):
            lo, hi = rank * n // r, (rank + 1) * n // r
            assert plan.batches_per_rank[rank] == math.ceil((hi - lo) / b)
            ids = _ids(plan, sizes, rank)
            assert sorted(ids) == list(range(lo, hi))
            got += ids
        assert sorted(got) == list(range(n))


@pytest.mark.parametrize("n,buf", [(0, 5), (1, 1), (10, 1), (50, 7), (50, 100), (257, 64)])
def test_buffer_permutation(n, buf):
    out = buffer_permutation(n, buf, np.random.default_rng(1))
    assert sorted(out) == list(range(n))
    assert all(p < t + buf for t, p in enumerate(out))  # bounded read-ahead
    assert out == buffer_permutation(n, buf, np.random.default_rng(1))
    if n > 10 and buf > 1:
        assert out != list(range(n))
