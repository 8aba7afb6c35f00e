"""``verify``: check every shard of a dataset directory against its manifest.

Checks, shard by shard (in manifest order, stopping at the first problem): the file exists,
its sha256 matches, it is a tar of regular members named ``<id>.<ext>`` grouped as
``cls``/``idx``/image per key, the key is ``{idx:09d}``, the i-th sample's id is ``first_idx + i``
(the layout the loader relies on, ``sample_checks``: so over all shards every id 0..N-1 occurs
exactly once, and a duplicate is named), ``cls`` is in range, the sample count matches and every image decodes in the format its extension names. Finally the
per-class counts must equal the manifest's.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import tarfile
from collections import Counter
from pathlib import Path

from dist_ssl.data.errors import ManifestError, ShardError
from dist_ssl.data.images import IMAGE_EXTS, decode_check
from dist_ssl.data.manifest import Manifest, ShardInfo, load_manifest
from dist_ssl.data.sample_checks import member_key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _samples(name: str, tar: tarfile.TarFile):
    """Yield ``(key, {ext: bytes})`` for consecutive members sharing a key."""
    key, parts = None, {}
    for m in tar:
        if not m.isfile():
            raise ShardError(f"{name}: member {m.name!r} is not a regular file")
        named = member_key(m.name)
        if named is None:
            raise ShardError(f"{name}: member {m.name!r} is not named <id>.<ext> (9+ digits, "
                             f"a lower-case extension)")
        k, ext = named
        if k != key and parts:
            yield key, parts
            parts = {}
        key = k
        if ext in parts:
            raise ShardError(f"{name}: sample {k} has two '.{ext}' members")
        parts[ext] = tar.extractfile(m).read()
    if parts:
        yield key, parts


def _int_field(name: str, key: str, parts: dict, field: str) -> int:
    raw = parts.get(field, b"")
    if not raw.isdigit():
        raise ShardError(f"{name}: sample {key} has a missing or non-integer '.{field}'")
    return int(raw)


def _check_sample(name: str, key: str, parts: dict, info: ShardInfo, num_classes: int,
                  seen: set) -> int:
    idx = _int_field(name, key, parts, "idx")
    cls = _int_field(name, key, parts, "cls")
    images = sorted(set(parts) - {"cls", "idx"})
    if len(images) != 1 or images[0] not in IMAGE_EXTS:
        raise ShardError(f"{name}: sample {key} has members {sorted(parts)}; expected cls, "
                         f"idx and one image ({', '.join(sorted(IMAGE_EXTS))})")
    if key != f"{idx:09d}":
        raise ShardError(f"{name}: sample key {key} does not match idx {idx}")
    if not info.first_idx <= idx < info.first_idx + info.num_samples:
        raise ShardError(f"{name}: idx {idx} outside the shard's range "
                         f"[{info.first_idx}, {info.first_idx + info.num_samples})")
    if idx in seen:
        raise ShardError(f"{name}: idx {idx} occurs twice")
    if idx != info.first_idx + len(seen):
        raise ShardError(f"{name}: sample {len(seen)} has idx {idx}, the layout needs "
                         f"{info.first_idx + len(seen)} (ids in shard order)")
    seen.add(idx)
    if cls >= num_classes:
        raise ShardError(f"{name}: sample {key} has cls {cls}, but there are "
                         f"{num_classes} classes")
    problem = decode_check(parts[images[0]], images[0])
    if problem:
        raise ShardError(f"{name}: sample {key} image {problem}")
    return cls


def verify_shard(out_dir: str, info: ShardInfo, num_classes: int) -> Counter:
    """Check one shard; returns its per-class sample counts. Raises :class:`ShardError`."""
    path = Path(out_dir) / info.name
    if not path.is_file():
        raise ShardError(f"{info.name}: missing")
    digest = _sha256(path)
    if digest != info.sha256:
        raise ShardError(f"{info.name}: sha256 mismatch (file {digest[:12]}..., "
                         f"manifest {info.sha256[:12]}...)")
    counts, seen = Counter(), set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, parts in _samples(info.name, tar):
                counts[_check_sample(info.name, key, parts, info, num_classes, seen)] += 1
    except tarfile.TarError as e:
        raise ShardError(f"{info.name}: not a readable tar ({e})") from None
    if len(seen) != info.num_samples:
        raise ShardError(f"{info.name}: {len(seen)} samples, manifest says {info.num_samples}")
    return counts


def _verify_job(job: tuple) -> Counter:
    return verify_shard(*job)


def verify_dataset(out_dir, workers: int = 1) -> Manifest:
    """Check every shard of ``out_dir`` (see module docstring); returns the manifest.

    Raises :class:`ShardError` naming the first problem (shard name + what).
    """
    try:
        m = load_manifest(out_dir)
    except ManifestError as e:
        raise ShardError(str(e)) from None
    jobs = [(str(out_dir), s, m.num_classes) for s in m.shards]
    total = Counter()
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for counts in pool.imap(_verify_job, jobs):  # ordered: first problem by shard
                total.update(counts)
    else:
        for job in jobs:
            total.update(_verify_job(job))
    got = [total.get(i, 0) for i in range(m.num_classes)]
    if got != m.class_counts:
        raise ShardError(f"{Path(out_dir) / 'manifest.json'}: shards hold class counts {got}, "
                         f"manifest says {m.class_counts}")
    return m
