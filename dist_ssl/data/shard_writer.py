"""Write a SOURCE as WebDataset shards plus ``manifest.json``; resumable.

Phases:
  1. plan      enumerate the source, order candidates (seeded), see :mod:`subsets`
  2. validate  decode each needed input file once with PIL (in ``workers`` processes);
               bad files are skipped (listed in the manifest) or, with ``strict``, an error
  3. ids       shuffle the selected valid samples (seeded); instance id = position, so
               ids are exactly 0..N-1 and shard k holds ids [k*S, (k+1)*S)
  4. write     shards in parallel, bytes copied (no decode; IDX rows encoded as PNG) or,
               with ``resize``, larger images re-encoded smaller (:mod:`shard_resize`),
               each written as ``*.tar.tmp`` then renamed, then a done record
  5. manifest  written last and atomically: its presence means "complete"

The plan (phases 1-3) is cached in ``OUT_DIR/.make_shards/plan.json``, and every decode in
``probes.jsonl``, so an interrupted run re-run with the same arguments neither decodes again
nor rewrites finished shards. Test hook: env ``DIST_SSL_SHARDS_FAIL_AFTER=k`` makes the run
crash while writing its (k+1)-th shard, leaving a partial ``.tmp`` as a kill would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from pathlib import Path

from dist_ssl.data.errors import BadImageError, DataError, OutDirError
from dist_ssl.data.images import probe_path_job
from dist_ssl.data.manifest import (MANIFEST_NAME, Manifest, ShardInfo, SkippedFile,
                                    save_manifest)
from dist_ssl.data.shard_state import OutDirState, locked, log_probe
from dist_ssl.data.shard_tar import ShardTask, shard_name, write_shard
from dist_ssl.data.sources import Record, Source, open_source
from dist_ssl.data.subsets import (SubsetRule, candidate_groups, parse_subset, select_valid,
                                   shuffle_order)

logger = logging.getLogger(__name__)

FAIL_AFTER_ENV = "DIST_SSL_SHARDS_FAIL_AFTER"
DEFAULT_QUALITY = 90  # JPEG quality of --resize (ImageNet's own files are around q90)


class _Runner:
    """Runs jobs in-process (workers=1) or in a lazily started spawn pool."""

    def __init__(self, workers: int):
        self.workers, self._pool = workers, None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._pool is not None:
            self._pool.terminate() if exc_type else self._pool.close()
            self._pool.join()

    def imap_unordered(self, fn, items: list, chunksize: int = 1):
        if self.workers == 1:
            return map(fn, items)
        if self._pool is None:  # spawn: safe after torch/threads were imported by the caller
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool.imap_unordered(fn, items, chunksize)


class _Progress:
    def __init__(self, what: str, total: int):
        self.what, self.total, self.count, self._next = what, total, 0, max(1, total // 10)

    def step(self) -> None:
        self.count += 1
        if self.count >= self._next or self.count == self.total:
            logger.info("%s: %d/%d", self.what, self.count, self.total)
            self._next = self.count + max(1, self.total // 10)


def _raise_bad(src: Source, ref: str, reason: str):
    raise BadImageError(f"bad image {os.path.join(src.root, ref)}: {reason} (--strict)")


class _Prober:
    """``check`` callback for :func:`select_valid`: decodes files once, caching results."""

    def __init__(self, src: Source, state: OutDirState, runner: _Runner, strict: bool):
        self.src, self.state, self.runner, self.strict = src, state, runner, strict
        self.cache = state.load_probes()
        self.bad: dict[str, str] = {}

    def _cached(self, rec: Record) -> bool:
        p = self.cache.get(rec.ref)
        try:
            st = os.stat(self.src.path_of(rec))
        except OSError:
            return False
        return p is not None and (p.size, p.mtime_ns) == (st.st_size, st.st_mtime_ns)

    def __call__(self, batch: list[Record]) -> list[bool]:
        todo = {self.src.path_of(r): r.ref for r in batch if not self._cached(r)}
        if todo:
            chunk = max(1, min(64, len(todo) // (8 * self.runner.workers)))
            progress = _Progress("validating", len(todo))
            with self.state.probe_log() as log:
                for path, probe in self.runner.imap_unordered(probe_path_job, list(todo), chunk):
                    self.cache[todo[path]] = probe
                    log_probe(log, todo[path], probe)
                    progress.step()
        bad = sorted(r.ref for r in batch if not self.cache[r.ref].ok)
        self.bad.update((ref, self.cache[ref].reason) for ref in bad)
        if self.strict and bad:
            _raise_bad(self.src, bad[0], self.cache[bad[0]].reason)
        return [self.cache[r.ref].ok for r in batch]


def _fingerprint(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()


def _make_plan(src: Source, rule: SubsetRule | None, seed: int, strict: bool,
               runner: _Runner, state: OutDirState, fingerprint: str) -> dict:
    plan = state.load_plan()
    if plan is not None and plan.get("fingerprint") == fingerprint:
        logger.info("using the cached plan (%d samples); nothing is decoded again",
                    len(plan["samples"]))
        return plan
    groups = candidate_groups(src.records, src.classes, rule, seed)
    if src.kind == "idx":  # arrays are valid by construction; rows become PNGs when written
        selected = select_valid(groups, rule, lambda batch: [True] * len(batch))
        ext, prober = {r.ref: ("png", -1) for r in selected}, None
    else:
        prober = _Prober(src, state, runner, strict)
        selected = select_valid(groups, rule, prober)
        ext = {r.ref: (prober.cache[r.ref].ext, prober.cache[r.ref].size) for r in selected}
    order = shuffle_order(selected, seed)
    plan = {"fingerprint": fingerprint, "classes": src.classes,
            "samples": [[r.ref, r.label, *ext[r.ref]] for r in order],
            "skipped": sorted(prober.bad.items()) if prober else []}
    state.save_plan(plan)
    return plan


def _task(src: Source, state: OutDirState, k: int, first: int, rows: list,
          crash: bool, args: dict) -> ShardTask:
    store = {"resize": args.get("resize"), "quality": args.get("quality") or DEFAULT_QUALITY}
    if src.kind == "idx":
        pixels = src.pixels[[int(r[0]) for r in rows]].tobytes()
        return ShardTask(str(state.out_dir), k, first, rows, pixels=pixels,
                         image_hw=tuple(src.pixels.shape[1:]), crash=crash, **store)
    return ShardTask(str(state.out_dir), k, first, rows, root=str(src.root), crash=crash,
                     **store)


def _write_shards(src: Source, plan: dict, sps: int, runner: _Runner,
                  state: OutDirState, args: dict) -> tuple[list[dict], int]:
    """Write every unfinished shard; return all shards' done records and how many were new."""
    samples = plan["samples"]
    bounds = [(k, first, min(sps, len(samples) - first))
              for k, first in enumerate(range(0, len(samples), sps))]
    records = {k: state.finished(shard_name(k), first, n) for k, first, n in bounds}
    todo = [b for b in bounds if records[b[0]] is None]
    if len(todo) < len(bounds):
        logger.info("resuming: %d of %d shards already finished", len(bounds) - len(todo),
                    len(bounds))
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "-1"))
    tasks = [_task(src, state, k, first, samples[first:first + n], (j == fail_after), args)
             for j, (k, first, n) in enumerate(todo)]
    progress = _Progress("writing shards", len(tasks))
    index = {shard_name(k): k for k, _, _ in todo}
    for rec in runner.imap_unordered(write_shard, tasks):
        records[index[rec["name"]]] = rec
        progress.step()
    return [records[k] for k, _, _ in bounds], len(tasks)


def _build_manifest(args: dict, fingerprint: str, plan: dict, done: list[dict]) -> Manifest:
    counts = Counter(row[1] for row in plan["samples"])
    classes = plan["classes"]
    return Manifest(
        num_samples=len(plan["samples"]), num_classes=len(classes), classes=classes,
        class_counts=[counts.get(i, 0) for i in range(len(classes))],
        shards=[ShardInfo(d["name"], d["num_samples"], d["sha256"], d["first_idx"])
                for d in done],
        skipped=[SkippedFile(p, r) for p, r in plan["skipped"]], fingerprint=fingerprint,
        **args)


def _check_args(samples_per_shard, seed, workers, resize, quality) -> None:
    for name, value, low in (("--samples-per-shard", samples_per_shard, 1),
                             ("--seed", seed, 0), ("--workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)
                               or resize < 1):
        raise DataError(f"--resize must be an integer >= 1 (the shorter side in pixels), "
                        f"got {resize!r}")
    if quality is not None:
        if resize is None:
            raise DataError("--quality applies only with --resize (byte copies keep the files)")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise DataError(f"--quality must be an integer in 1..100, got {quality!r}")


def _store_args(resize, quality) -> dict:
    """The resize arguments as recorded: absent for a byte copy (older datasets match)."""
    if resize is None:
        return {}
    return {"resize": resize, "quality": DEFAULT_QUALITY if quality is None else quality}


def _make_out_dir(out: Path, src: Source) -> Path:
    if out.exists() and not out.is_dir():
        raise OutDirError(f"OUT_DIR is not a directory: {out}")
    if src.kind == "imagefolder" and out.resolve().is_relative_to(src.root):
        raise OutDirError(f"OUT_DIR {out} is inside the image folder {src.root}; "
                          f"its shards would become a class")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_dataset(source: str, out_dir, split: str = "train", samples_per_shard: int = 1000,
                  subset: str | None = None, seed: int = 0, workers: int = 1,
                  overwrite: bool = False, strict: bool = False, resize: int | None = None,
                  quality: int | None = None) -> Manifest:
    """Shard ``source`` into ``out_dir``; see the module docstring. Returns the manifest.

    ``resize``: store images whose shorter side is larger as JPEGs (``quality``, default 90)
    with that shorter side (:mod:`shard_resize`); None (default) copies the files' bytes.
    Re-running the same call after an interruption finishes the missing shards; on a
    complete dataset it returns at once. Raises :class:`DataError` subclasses for bad input.
    """
    return write_dataset_report(source, out_dir, split, samples_per_shard, subset, seed,
                                workers, overwrite, strict, resize, quality)[0]


def write_dataset_report(source: str, out_dir, split: str = "train",
                         samples_per_shard: int = 1000, subset: str | None = None,
                         seed: int = 0, workers: int = 1, overwrite: bool = False,
                         strict: bool = False, resize: int | None = None,
                         quality: int | None = None) -> tuple[Manifest, int]:
    """:func:`write_dataset`, also returning how many shards this call wrote (0: complete)."""
    _check_args(samples_per_shard, seed, workers, resize, quality)
    rule = parse_subset(subset)
    src = open_source(source, split)
    args = {"source": src.spec, "split": split, "subset": str(rule) if rule else None,
            "seed": seed, "samples_per_shard": samples_per_shard,
            **_store_args(resize, quality)}
    fingerprint = _fingerprint(args)
    out = _make_out_dir(Path(out_dir), src)
    state = OutDirState(out)
    with locked(out), _Runner(workers) as runner:
        state.claim(args, overwrite)
        manifest, written = state.complete_manifest(), 0
        if manifest is None:
            (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on: incomplete
            plan = _make_plan(src, rule, seed, strict, runner, state, fingerprint)
            if strict and plan["skipped"]:  # a cached plan made without --strict
                _raise_bad(src, *plan["skipped"][0])
            done, written = _write_shards(src, plan, samples_per_shard, runner, state, args)
            manifest = _build_manifest(args, fingerprint, plan, done)
            save_manifest(out, manifest)
        else:
            logger.info("%s is already complete (%d samples)", out, manifest.num_samples)
            if strict and manifest.skipped:
                _raise_bad(src, manifest.skipped[0].path, manifest.skipped[0].reason)
    if manifest.skipped:
        logger.warning("skipped %d bad file(s), listed in %s; first: %s (%s)",
                       len(manifest.skipped), out / MANIFEST_NAME, manifest.skipped[0].path,
                       manifest.skipped[0].reason)
    return manifest, written
