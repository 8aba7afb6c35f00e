"""Train/eval loaders over a shard directory: per-(rank, worker) streams, exact resume.

Batch dict (B = per-rank batch size, C = in_chans)::

    {"index": LongTensor [B] instance ids, "label": LongTensor [B] class ids,
     "views": [FloatTensor [B, C, S_i, S_i] for each crop i of the ViewSpec]}

Workers send views as uint8 (a quarter of the shared-memory traffic, which costs about as much
CPU as the augmentation for float multi-crop batches); the loader normalises them in the main
process. With ``uint8_views=True`` they stay uint8: move them to the accelerator and call
``loader.normalize(view)`` there (the cheapest path for GPU training).

What an epoch is (ids, repeats, drops, equal batch counts per rank) is documented in
:mod:`dist_ssl.data.stream_plan`. Batches are made inside DataLoader workers (``batch_size=None``);
worker w makes batches ``b % W == w`` of its rank, which is the order torch's DataLoader asks
for them in, so ``(epoch, step)`` maps to a known number of already-made batches per worker (on
resume, DataLoader worker j plays stream ``(j + step) % W``, as torch asks worker 0 first).
A batch draws from its stream's stretch of the epoch order (a few shards at most); the shard
writer shuffles ids globally, so shards are class-mixed (as in any webdataset pipeline).

Resume: ``set_position(epoch, step)`` makes the next iteration start at batch ``step``. Every
stream's sample order is known in advance and every view is seeded by (seed, epoch, id, repeat,
view), so the skipped samples are passed over without being read or decoded and the following
batches are bit-identical to an uninterrupted run's (same seed, world size, workers, batch size).

Corrupt samples (bytes that do not decode, missing members, truncated tars) are logged and
replaced, so every rank still yields exactly ``len(loader)`` full batches: a bad sample is
replaced by the next valid sample of the same batch (cyclically, with fresh augmentation); a
batch with no valid sample is filled with the next valid sample later in its stream. Both depend
only on the data, not on what was iterated before, so resume stays exact. (Only if the whole rest
of a stream is corrupt does it repeat the previous valid sample, and a stream with no valid sample
at all raises.) Eval loaders drop corrupt samples instead (their batches may be short).
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_ssl.data.augment import make_views, normalize, stack_views, view_rng
from dist_ssl.data.decode import SKIPPED, SampleError, decode_sample, read_range
from dist_ssl.data.manifest import load_manifest
from dist_ssl.data.stream_plan import (
    EpochPlan, buffer_permutation, epoch_rng, plan_epoch, plan_eval, worker_batches)
from dist_ssl.data.views import ViewSpec, eval_view_spec
from dist_ssl.data.worker_lifetime import die_with_this_process

log = logging.getLogger(__name__)
_MAX_WARNINGS = 10  # per worker and epoch; then one summary line
# How DataLoader workers start (they restart every epoch). "fork" from a training process can
# deadlock the child in CPython's PyOS_AfterFork_Child if another Python thread (the previous
# epoch's queue feeders, metric/checkpoint threads) starts or ends at that moment: seen here as a
# worker stuck forever in the 2-rank gloo test. "spawn" re-imports torch per worker per epoch.
# "forkserver" imports this module once in a single-threaded server (~5 s), then forks workers
# from it (~0.3 s/epoch); as with spawn, scripts need the __main__ guard and ViewSpec.hook must
# be picklable. (Python 3.14 makes forkserver the Linux default for this reason.)
_DEFAULT_MP = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


class ShardStream(IterableDataset):
    """One rank's view of a shard dir; each DataLoader worker iterates its own stream."""

    def __init__(self, shard_dir, spec: ViewSpec, batch_size: int, *, rank: int,
                 world_size: int, num_workers: int, seed: int, drop_last: bool,
                 shuffle_buffer: int, train: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.shard_dir = Path(shard_dir)
        self.manifest = load_manifest(self.shard_dir)
        self.paths = [self.shard_dir / s.name for s in self.manifest.shards]
        self.sizes = [s.num_samples for s in self.manifest.shards]
        self.spec, self.batch_size, self.rank = spec, batch_size, rank
        self.world_size, self.num_workers, self.seed = world_size, num_workers, seed
        self.drop_last, self.shuffle_buffer, self.train = drop_last, shuffle_buffer, train
        self.epoch, self.start_step = 0, 0  # set by the loader before each iteration

    def plan(self, epoch: int) -> EpochPlan:
        if self.train:
            return plan_epoch(self.sizes, self.world_size, self.num_workers, self.batch_size,
                              self.seed, epoch, self.drop_last)
        return plan_eval(self.sizes, self.world_size, self.num_workers, self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        n_workers = max(1, self.num_workers)
        # The DataLoader asks worker 0 first, and batch `start_step` belongs to stream
        # start_step % W: on resume, DataLoader worker j plays stream (j + start_step) % W.
        worker = ((info.id if info is not None else 0) + self.start_step) % n_workers
        plan = self.plan(self.epoch)
        ranges = plan.streams[self.rank][worker]
        n = sum(r.count for r in ranges)
        if self.train:
            order = buffer_permutation(n, self.shuffle_buffer,
                                       epoch_rng(self.seed, self.epoch, self.rank, worker))
        else:
            order = list(range(n))
        done = worker_batches(self.start_step, n_workers, worker)
        k = min(n, done * self.batch_size)
        samples = self._ordered(ranges, order, k)
        self._bad = 0
        yield from (self._train_batches if self.train else self._eval_batches)(samples)
        if self._bad:
            log.warning("rank %d worker %d epoch %d: %d corrupt samples replaced/dropped",
                        self.rank, worker, self.epoch, self._bad)

    def _ordered(self, ranges, order, k):
        """(raw sample, rep) in stream order ``order[k:]``; holds <= shuffle_buffer samples."""
        skip = set(order[:k])
        positions = self._positions(ranges, skip)
        held = {}
        for pos in order[k:]:
            while pos not in held:
                p, raw, rep = next(positions)
                if raw is not SKIPPED:
                    held[p] = (raw, rep)
            yield held.pop(pos)

    def _positions(self, ranges, skip):
        base = 0
        for r in ranges:
            wanted = (lambda i, b=base: b + i not in skip)
            for i, raw in enumerate(read_range(self.paths[r.shard], r.start, r.count, wanted)):
                yield base + i, raw, r.rep
            base += r.count

    def _decode(self, raw, rep, salt=0, count=True):
        """(views as uint8 arrays, label, idx) or None for a corrupt sample."""
        try:
            img, label, idx = decode_sample(raw)
            rngs = [view_rng(self.seed, self.epoch, idx, rep, v, salt)
                    for v in range(self.spec.num_views)]
            return make_views(img, self.spec, rngs), label, idx
        except (SampleError, OSError, ValueError) as e:
            if not count:
                return None
            self._bad += 1
            if self._bad <= _MAX_WARNINGS:
                log.warning("rank %d epoch %d: corrupt sample skipped: %s",
                            self.rank, self.epoch, e)
            return None

    def _collate(self, decoded):
        views = [stack_views([d[0][v] for d in decoded]) for v in range(self.spec.num_views)]
        return {"index": torch.tensor([d[2] for d in decoded], dtype=torch.long),
                "label": torch.tensor([d[1] for d in decoded], dtype=torch.long),
                "views": views}

    def _train_batches(self, samples):
        pending, last_good = deque(), None
        while True:
            while len(pending) < self.batch_size:
                nxt = next(samples, None)
                if nxt is None:
                    break
                pending.append(nxt)
            if not pending:
                return
            chunk = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
            decoded = [self._decode(raw, rep) for raw, rep in chunk]
            good = [j for j, d in enumerate(decoded) if d is not None]
            if not good:
                fill = self._lookahead(pending, samples) or last_good
                if fill is None:
                    raise RuntimeError(f"rank {self.rank}: no decodable sample in a whole "
                                       f"stream of {self.shard_dir} (epoch {self.epoch})")
                decoded = [None] * len(chunk)
                chunk = [fill] * len(chunk)
                good = []
            for j in range(len(chunk)):  # replace bad slots by the next valid one, cyclically
                if decoded[j] is None:
                    src = next((g for g in good if g > j), good[0]) if good else None
                    raw, rep = chunk[src] if src is not None else chunk[j]
                    decoded[j] = self._decode(raw, rep, salt=j + 1)
            last_good = chunk[good[-1]] if good else chunk[0]
            yield self._collate(decoded)

    def _lookahead(self, pending, samples):
        """First decodable (raw, rep) after the current batch, keeping what it reads pending."""
        for item in pending:
            if self._decode(*item, count=False) is not None:
                return item
        for item in samples:
            pending.append(item)
            if self._decode(*item, count=False) is not None:
                return item
        return None

    def _eval_batches(self, samples):
        batch = []
        for i, (raw, rep) in enumerate(samples, 1):
            d = self._decode(raw, rep)
            if d is not None:
                batch.append(d)
            if i % self.batch_size == 0:
                if batch:
                    yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)


class TrainLoader:
    """Iterable of batch dicts for one rank; ``len()`` = batches per epoch (equal on all ranks).

    Call ``set_epoch(e)`` before each epoch (the order is a function of (seed, epoch));
    ``set_position(e, step)`` instead to resume: the next iteration yields batches step..len-1.
    ``position`` is (epoch, batches yielded so far): save it with a checkpoint.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int = 2, mp_context: str | None = _DEFAULT_MP,
                 uint8_views: bool = False):
        self.stream, self.num_workers, self.mp_context = stream, num_workers, mp_context
        self.uint8_views = uint8_views
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self._start, self._step = 0, 0, 0

    @property
    def num_samples(self) -> int:
        return self.stream.manifest.num_samples

    @property
    def num_classes(self) -> int:
        return self.stream.manifest.num_classes

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self._step

    def __len__(self) -> int:
        return self.stream.plan(self.epoch).batches_per_rank[self.stream.rank]

    def normalize(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 view [B, C, H, W] -> normalised float32, on the view's device."""
        return normalize(view, *self.stream.spec.norm)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, step: int) -> None:
        if epoch < 0 or not 0 <= step <= len(self):  # len() does not depend on the epoch
            raise ValueError(f"position ({epoch}, {step}) outside 0 <= step <= {len(self)}")
        self.epoch, self._start, self._step = epoch, step, step

    def __iter__(self):
        self.stream.epoch, self.stream.start_step = self.epoch, self._start
        expected = len(self) - self._start
        self._start = 0  # a position applies to one iteration; the next restarts the epoch
        kwargs = {}
        if self.num_workers > 0:
            ctx = multiprocessing.get_context(self.mp_context)
            if self.mp_context == "forkserver":
                ctx.set_forkserver_preload(["__main__", __name__])  # no-op once it runs
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False,
                      "multiprocessing_context": ctx, **die_with_this_process()}
        # An own generator: DataLoader.__iter__ otherwise draws a base seed from the GLOBAL
        # torch RNG, which shifts the model's dropout / drop-path stream on resume (the workers
        # need no seed from it: every view is seeded per sample).
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0),
                            **kwargs)
        got = 0
        for batch in loader:
            got += 1
            self._step += 1
            if not self.uint8_views:
                batch["views"] = [self.normalize(v) for v in batch["views"]]
            yield batch
        if self.stream.train and got != expected:  # the equal-batch guarantee, checked
            raise RuntimeError(f"rank {self.stream.rank}: {got} batches, expected {expected}")


class EvalLoader(TrainLoader):
    """Every sample exactly once over ranks (rank r: ids ``[r*N//R, (r+1)*N//R)`` of the
    manifest order); ``len()`` may differ by one between ranks and the last batch is short.
    Do not run collectives per batch: gather at the end, e.g. all_gather the per-rank counts
    (``rank_num_samples``), pad features to the max, all_gather, trim and sort by ``index``.
    """

    def rank_num_samples(self, rank: int) -> int:
        n, r = self.num_samples, self.stream.world_size
        return (rank + 1) * n // r - rank * n // r

    def set_position(self, epoch: int, step: int) -> None:
        if step:
            raise ValueError("eval loaders do not resume mid-pass")
        super().set_position(epoch, 0)


def build_train_loader(shard_dir, view_spec: ViewSpec, batch_size: int, *, rank: int = 0,
                       world_size: int = 1, num_workers: int = 2, seed: int = 0,
                       drop_last: bool = False, shuffle_buffer: int = 1000,
                       pin_memory: bool = False, prefetch_factor: int = 2,
                       mp_context: str | None = _DEFAULT_MP,
                       uint8_views: bool = False) -> TrainLoader:
    """Training loader for one rank (semantics: this module's and ``stream_plan``'s docstrings).

    batch_size: per rank. num_workers: DataLoader workers (0 = in this process); the epoch
    order depends on it, so resume with the same value. drop_last: False pads with the fewest
    repeats so every rank gets ceil(N / (world_size * batch_size)) full batches; True drops
    the remainder. shuffle_buffer: samples a worker holds to shuffle its stream (encoded bytes).
    uint8_views: leave views uint8 (normalise on the device with ``loader.normalize``); with
    pin_memory it is the uint8 views that get pinned. mp_context: see ``_DEFAULT_MP``.
    """
    stream = ShardStream(shard_dir, view_spec, batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, drop_last=drop_last,
                         shuffle_buffer=shuffle_buffer, train=True)
    return TrainLoader(stream, num_workers=num_workers, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor, mp_context=mp_context,
                       uint8_views=uint8_views)


def build_eval_loader(shard_dir, size: int, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, num_workers: int = 2, in_chans: int = 3,
                      crop_pct: float = 0.875, mean=None, std=None, pin_memory: bool = False,
                      mp_context: str | None = _DEFAULT_MP) -> EvalLoader:
    """Eval loader (resize + center crop, one view) covering every sample once over ranks."""
    spec = eval_view_spec(size, in_chans, crop_pct, mean, std)
    stream = ShardStream(shard_dir, spec, batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=0, drop_last=False,
                         shuffle_buffer=1, train=False)
    return EvalLoader(stream, num_workers=num_workers, pin_memory=pin_memory,
                      mp_context=mp_context)
