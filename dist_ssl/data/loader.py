"""Train/eval loaders over a shard directory: per-(rank, worker) streams, exact resume.

Batch dict (B = per-rank batch size, C = in_chans)::

    {"index": LongTensor [B] instance ids, "label": LongTensor [B] class ids,
     "views": [FloatTensor [B, C, S_i, S_i] for each crop i of the ViewSpec]}

Workers send views as uint8 (a quarter of the shared-memory traffic, which costs about as much
CPU as the augmentation for float multi-crop batches); the loader normalises them in the main
process. With ``uint8_views=True`` they stay uint8 (pinned with ``pin_memory``):
``loader.to_device(batch, device)`` copies and normalises them on the device (what the trainer
does, :mod:`dist_ssl.data.device_views`).

Decoding (``decode``, ``reduced_decode``): on the CPU, a sample's crop plans are drawn from its
header size first and the JPEG is decoded once at the smallest scale that serves every crop
(:mod:`dist_ssl.data.reduced_decode`); ``decode="gpu"`` ships JPEG bytes + plans instead and the
views are made on the device by ``loader.to_device`` (:mod:`dist_ssl.data.gpu_decode`; such
batches hold "images", "shapes" and "plan" instead of "views" until then).

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

Corrupt samples (bytes that do not decode, missing members, truncated tars, a class or instance
id that disagrees with the manifest and the shard layout, see ``sample_checks``) are logged,
counted and replaced, so every rank still yields exactly ``len(loader)`` full batches: a bad sample is
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

from dist_ssl.data import gpu_payload
from dist_ssl.data.augment import normalize, stack_views, view_rng
from dist_ssl.data.decode import SKIPPED, SampleError, read_range
from dist_ssl.data.device_views import batch_to_device
from dist_ssl.data.errors import StreamError
from dist_ssl.data.manifest import load_manifest
from dist_ssl.data.reduced_decode import decode_views
from dist_ssl.data.sample_checks import EXPECTED_ID, check_sample
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
DECODE_MODES = ("cpu", "gpu")


class ShardStream(IterableDataset):
    """One rank's view of a shard dir; each DataLoader worker iterates its own stream."""

    def __init__(self, shard_dir, spec: ViewSpec, batch_size: int, *, rank: int,
                 world_size: int, num_workers: int, seed: int, drop_last: bool,
                 shuffle_buffer: int, train: bool, reduced_decode: bool = True,
                 decode: str = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if decode == "gpu":
            gpu_payload.check_spec(spec)
        self.reduced_decode, self.decode = reduced_decode, decode
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
            first = self.manifest.shards[r.shard].first_idx + r.start  # the id layout: sample_checks
            for i, raw in enumerate(read_range(self.paths[r.shard], r.start, r.count, wanted,
                                               self._rejected)):
                if isinstance(raw, dict):
                    raw[EXPECTED_ID] = first + i
                yield base + i, raw, r.rep
            base += r.count

    def _rejected(self, name: str) -> None:
        self._count_bad(f"tar member {name!r} rejected (not a <id>.<ext> name make_shards writes)")

    def _count_bad(self, reason) -> None:
        self._bad += 1
        if self._bad <= _MAX_WARNINGS:
            log.warning("rank %d epoch %d: corrupt sample skipped: %s", self.rank, self.epoch, reason)

    def _decode(self, raw, rep, salt=0, count=True):
        """(views as uint8 arrays or a GPU payload, label, idx), or None for a corrupt sample."""
        def rngs_for(idx):
            return [view_rng(self.seed, self.epoch, idx, rep, v, salt)
                    for v in range(self.spec.num_views)]
        try:
            check_sample(raw, self.manifest.num_classes, self.manifest.num_samples)
            if self.decode == "gpu":
                return gpu_payload.prepare(raw, self.spec, rngs_for)
            return decode_views(raw, self.spec, rngs_for, self.reduced_decode)
        except (SampleError, OSError, ValueError) as e:
            if count:
                self._count_bad(e)
            return None

    def _collate(self, decoded):
        if self.decode == "gpu":
            return gpu_payload.collate(decoded)
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
                    raise StreamError(f"rank {self.rank}: no decodable sample in a whole stream "
                                      f"of {self.shard_dir} (epoch {self.epoch}); run "
                                      f"make_shards verify on it")
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
                 uint8_views: bool = False, non_blocking: bool = True):
        self.stream, self.num_workers, self.mp_context = stream, num_workers, mp_context
        self.uint8_views, self.non_blocking = uint8_views, non_blocking
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

    @property
    def spec(self) -> ViewSpec:
        return self.stream.spec

    def normalize(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 view [B, C, H, W] -> normalised float32, on the view's device."""
        return normalize(view, *self.stream.spec.norm)

    def to_device(self, batch: dict, device, dtype: torch.dtype | None = None) -> dict:
        """A batch of this loader on ``device`` with normalised float views (``dtype`` if
        given), decoded there for ``decode="gpu"``: see :mod:`dist_ssl.data.device_views`."""
        return batch_to_device(batch, self.stream.spec, torch.device(device), dtype,
                               self.non_blocking)

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
            if not self.uint8_views and "views" in batch:
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
                       uint8_views: bool = False, non_blocking: bool = True,
                       reduced_decode: bool = True, decode: str = "cpu") -> TrainLoader:
    """Training loader for one rank (semantics: this module's and ``stream_plan``'s docstrings).

    batch_size: per rank. num_workers: DataLoader workers (0 = in this process); the epoch
    order depends on it, so resume with the same value. drop_last: False pads with the fewest
    repeats so every rank gets ceil(N / (world_size * batch_size)) full batches; True drops
    the remainder. shuffle_buffer: samples a worker holds to shuffle its stream (encoded bytes).
    uint8_views: leave views uint8 (normalise on the device with ``loader.to_device``); with
    pin_memory it is the uint8 views that get pinned; non_blocking: asynchronous copies in
    ``to_device``. reduced_decode: decode JPEGs at the smallest scale serving every crop (False:
    always full size). decode: "cpu" (views made in the workers) or "gpu" (workers ship JPEG
    bytes + crop plans, ``to_device`` decodes and renders). mp_context: see ``_DEFAULT_MP``.
    """
    stream = ShardStream(shard_dir, view_spec, batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, drop_last=drop_last,
                         shuffle_buffer=shuffle_buffer, train=True,
                         reduced_decode=reduced_decode, decode=decode)
    return TrainLoader(stream, num_workers=num_workers, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor, mp_context=mp_context,
                       uint8_views=uint8_views, non_blocking=non_blocking)


def build_eval_loader(shard_dir, size: int, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, num_workers: int = 2, in_chans: int = 3,
                      crop_pct: float = 0.875, mean=None, std=None, pin_memory: bool = False,
                      mp_context: str | None = _DEFAULT_MP) -> EvalLoader:
    """Eval loader (resize + center crop, one view) covering every sample once over ranks."""
    spec = eval_view_spec(size, in_chans, crop_pct, mean, std)
    # Full-size decode: eval views stay exactly timm's resize + center crop (a JPEG decoded at
    # 1/r and resized differs by ~2-3 levels in 255), so accuracies compare with the papers'.
    stream = ShardStream(shard_dir, spec, batch_size, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=0, drop_last=False,
                         shuffle_buffer=1, train=False, reduced_decode=False)
    return EvalLoader(stream, num_workers=num_workers, pin_memory=pin_memory,
                      mp_context=mp_context)
