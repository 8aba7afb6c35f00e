"""Which samples each (rank, DataLoader worker) stream reads in one epoch: pure, no I/O.

Epoch semantics
---------------
An epoch is defined on sample ids, not on shards. Let N be the number of samples of the shard
directory, R the world size, W the DataLoader workers per rank (``max(1, num_workers)``) and
B the per-rank batch size.

1. The *epoch order* is a deterministic function of ``(seed, epoch)``: the shards are permuted,
   concatenated (each shard in its tar order) and rotated by a random offset. Every id appears
   exactly once in it.
2. Every rank yields the same number of full batches ``nb``:
   - ``drop_last=False`` (default): ``nb = ceil(N / (R*B))``. The epoch order is extended
     cyclically to ``T = nb*R*B`` positions, so the first ``T - N < R*B`` ids of the epoch order
     are seen twice (``rep=1``) and every other id once: the fewest repeats that give every rank
     the same number of full batches. ``N < R*B`` is allowed (some ids then repeat more often).
   - ``drop_last=True``: ``nb = floor(N / (R*B))``; the last ``N - T < R*B`` ids of the epoch
     order are not seen this epoch (a different set every epoch). Needs ``N >= R*B``.
3. Batch ``b`` of a rank is produced by its worker ``b % W`` (torch's DataLoader asks workers of
   an IterableDataset round-robin), so worker ``w`` owns ``len(range(w, nb, W))`` batches.
   The ``T`` positions are cut into contiguous chunks, one per stream, in (rank, worker) order,
   each exactly ``B x`` its batch count long. A chunk becomes a few ``Range(shard, start, count,
   rep)``: shards hold contiguous id ranges, so this works with uneven shard sizes and with fewer
   shards than R*W (streams then read sub-ranges of the same shard). No stream is empty unless
   a rank has fewer batches than workers (then the spare workers just yield nothing).
4. Inside a stream the samples are shuffled with a bounded buffer whose output order is a
   permutation of stream positions precomputed from ``(seed, epoch, rank, worker)``
   (:func:`buffer_permutation`). Knowing the order in advance is what lets a resumed run skip
   the first ``k`` samples of a stream without decoding them.

The plan depends on ``(seed, epoch, R, W, B, drop_last)``; an exact mid-epoch resume needs the
same values. Evaluation (:func:`plan_eval`) uses no shuffling, no repeats and no drops: rank r
reads ids in manifest order ``[r*N//R, (r+1)*N//R)`` and its last batch may be short.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Range:
    """``count`` consecutive samples of shard ``shard`` (manifest index) from member ``start``.

    ``rep`` is the occurrence of these samples in the epoch (0 first, 1 for padding repeats);
    augmentation seeds include it so a padded repeat gets different views.
    """

    shard: int
    start: int
    count: int
    rep: int = 0


@dataclass(frozen=True)
class EpochPlan:
    """streams[rank][worker]: ranges read in order; stream_batches[rank][worker]: batches."""

    streams: list[list[list[Range]]]
    stream_batches: list[list[int]]
    batches_per_rank: list[int]
    batch_size: int


def worker_batches(num_batches: int, num_workers: int, worker: int) -> int:
    """Batches owned by ``worker`` when batch b goes to worker ``b % num_workers``."""
    return len(range(worker, num_batches, num_workers))


def epoch_rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (seed, epoch, ...)."""
    return np.random.default_rng([int(k) for k in key])


def _spans_to_ranges(a: int, b: int, cum: list[int], order: list[int], offset: int) -> list[Range]:
    """Ranges covering positions [a, b) of the rotated, cyclically extended epoch order."""
    n = cum[-1]
    out = []
    p = a
    while p < b:
        q = (p + offset) % n  # position in the (permuted) concatenation of shards
        k = bisect.bisect_right(cum, q) - 1
        count = min(b - p, cum[k + 1] - q, (p // n + 1) * n - p)
        shard = order[k]
        out.append(Range(shard, q - cum[k], count, p // n))
        p += count
    return out


def plan_epoch(shard_sizes: list[int], world_size: int, num_workers: int, batch_size: int,
               seed: int, epoch: int, drop_last: bool = False) -> EpochPlan:
    """Training plan of one epoch (see module docstring for the semantics)."""
    n = int(sum(shard_sizes))
    r_, w_, b_ = world_size, max(1, num_workers), batch_size
    if n <= 0 or r_ < 1 or b_ < 1:
        raise ValueError(f"need samples, world_size>=1, batch_size>=1 (got N={n}, R={r_}, B={b_})")
    if drop_last:
        nb = n // (r_ * b_)
        if nb == 0:
            raise ValueError(f"drop_last=True with N={n} < world_size*batch_size={r_ * b_}: "
                             "no full batch; use drop_last=False")
    else:
        nb = math.ceil(n / (r_ * b_))
    rng = epoch_rng(seed, epoch)
    order = [int(i) for i in rng.permutation(len(shard_sizes))]
    offset = int(rng.integers(n))
    cum = [0]
    for k in order:
        cum.append(cum[-1] + int(shard_sizes[k]))
    streams, counts, pos = [], [], 0
    for _ in range(r_):
        rank_streams, rank_counts = [], []
        for w in range(w_):
            nbw = worker_batches(nb, w_, w)
            rank_streams.append(_spans_to_ranges(pos, pos + nbw * b_, cum, order, offset))
            rank_counts.append(nbw)
            pos += nbw * b_
        streams.append(rank_streams)
        counts.append(rank_counts)
    return EpochPlan(streams, counts, [nb] * r_, b_)


def plan_eval(shard_sizes: list[int], world_size: int, num_workers: int,
              batch_size: int) -> EpochPlan:
    """Evaluation plan: every id exactly once over ranks, manifest order, last batch short.

    Worker w of rank r gets the rank's batches ``b % W == w``, one Range list per batch, so the
    DataLoader's round-robin delivers the rank's batches in id order.
    """
    n, w_ = int(sum(shard_sizes)), max(1, num_workers)
    cum = [0]
    for s in shard_sizes:
        cum.append(cum[-1] + int(s))
    order = list(range(len(shard_sizes)))
    streams, counts, nbs = [], [], []
    for r in range(world_size):
        lo, hi = r * n // world_size, (r + 1) * n // world_size
        nb = math.ceil((hi - lo) / batch_size)
        rank_streams: list[list[Range]] = [[] for _ in range(w_)]
        for b in range(nb):
            a = lo + b * batch_size
            rank_streams[b % w_] += _spans_to_ranges(a, min(a + batch_size, hi), cum, order, 0)
        streams.append(rank_streams)
        counts.append([worker_batches(nb, w_, w) for w in range(w_)])
        nbs.append(nb)
    return EpochPlan(streams, counts, nbs, batch_size)


def buffer_permutation(n: int, buffer_size: int, rng: np.random.Generator) -> list[int]:
    """Output order of a shuffle buffer of ``buffer_size`` over stream positions 0..n-1.

    Position ``out[t]`` is always ``< t + buffer_size``, so a reader that reads the stream
    sequentially holds at most ``buffer_size`` samples to produce this order.
    """
    buffer_size = max(1, buffer_size)
    out, buf = [], []
    if n == 0:
        return out
    picks = rng.random(n)
    for pos in range(n):
        buf.append(pos)
        if len(buf) >= buffer_size:
            j = int(picks[pos] * len(buf))
            out.append(buf[j])
            buf[j] = buf[-1]
            buf.pop()
    rest = rng.permutation(len(buf))
    out.extend(buf[i] for i in rest)
    return out
