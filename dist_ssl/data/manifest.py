"""``manifest.json``: the description of a sharded dataset, written last by ``make_shards``.

Its presence means the dataset is complete. Layout of a dataset directory::

    OUT_DIR/shard-000000.tar ... shard-<S-1>.tar   WebDataset tars
    OUT_DIR/manifest.json                         this file
    OUT_DIR/.make_shards/                         writer state for resuming (not needed to read)

Instance ids (``idx``) are exactly ``0..num_samples-1``. Shards are filled in id order, so
shard ``k`` holds the contiguous id range ``[first_idx, first_idx + num_samples)`` and its i-th
sample has id ``first_idx + i`` (``verify`` and the loader check this); the ids themselves are
positions in a seeded shuffle, so every shard mixes classes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dist_ssl.atomic import atomic_write_json
from dist_ssl.data.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Arguments that determine the bytes of the dataset; equal values = "the same command".
FINGERPRINT_FIELDS = ("source", "split", "subset", "seed", "samples_per_shard", "resize", "quality")
# Recorded only when set (a byte-copy dataset has neither): older datasets keep their arguments.
OPTIONAL_ARGS = ("resize", "quality")


@dataclass(frozen=True)
class ShardInfo:
    """One tar: file name (relative to the dataset dir), sample count, sha256, first id."""

    name: str
    num_samples: int
    sha256: str
    first_idx: int


@dataclass(frozen=True)
class SkippedFile:
    """An input file left out because it could not be decoded; ``path`` is source-relative."""

    path: str
    reason: str


@dataclass
class Manifest:
    """Everything a reader needs: counts, class names, shards; plus how it was made."""

    num_samples: int
    num_classes: int
    classes: list[str]
    class_counts: list[int]
    shards: list[ShardInfo]
    source: str
    split: str
    subset: str | None
    seed: int
    samples_per_shard: int
    skipped: list[SkippedFile] = field(default_factory=list)
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION
    resize: int | None = None  # --resize: images stored with this shorter side (None: bytes copied)
    quality: int | None = None  # --quality of the re-encoded JPEGs (with resize only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def args(self) -> dict:
        """The arguments that made this dataset (see ``FINGERPRINT_FIELDS``)."""
        return {k: getattr(self, k) for k in FINGERPRINT_FIELDS
                if k not in OPTIONAL_ARGS or getattr(self, k) is not None}


def save_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Atomically write ``out_dir/manifest.json``; returns its path."""
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


# (name, accepted types); bool is excluded from int checks below.
_FIELDS = {
    "format_version": int, "num_samples": int, "num_classes": int, "classes": list,
    "class_counts": list, "shards": list, "source": str, "split": str,
    "subset": (str, type(None)), "seed": int, "samples_per_shard": int,
    "skipped": list, "fingerprint": str,
}
_OPTIONAL_FIELDS = {"resize": (int, type(None)), "quality": (int, type(None))}
_SHARD_FIELDS = {"name": str, "num_samples": int, "sha256": str, "first_idx": int}


def _check_type(where: str, key: str, value, types) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ManifestError(f"{where}: field '{key}' has type {type(value).__name__}")


def load_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``out_dir/manifest.json`` (or a path to the file itself).

    Raises :class:`ManifestError` with a one-line message naming the file and the problem.
    """
    path = Path(out_dir)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found (dataset missing or incomplete)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return _validate(str(path), raw)


def _validate(where: str, raw: dict) -> Manifest:
    for key, types in _FIELDS.items():
        if key not in raw:
            raise ManifestError(f"{where}: missing field '{key}'")
        _check_type(where, key, raw[key], types)
    if raw["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {raw['format_version']} "
                            f"is not supported (expected {FORMAT_VERSION})")
    shards = [_shard(where, i, s) for i, s in enumerate(raw["shards"])]
    skipped = [_skipped(where, s) for s in raw["skipped"]]
    kwargs = {k: raw[k] for k in _FIELDS if k not in ("shards", "skipped")}
    for key, types in _OPTIONAL_FIELDS.items():
        if key in raw:
            _check_type(where, key, raw[key], types)
            kwargs[key] = raw[key]
    m = Manifest(**kwargs, shards=shards, skipped=skipped)
    _check_consistency(where, m)
    return m


def _shard(where: str, i: int, s) -> ShardInfo:
    if not isinstance(s, dict):
        raise ManifestError(f"{where}: shards[{i}] is not an object")
    for key, types in _SHARD_FIELDS.items():
        if key not in s:
            raise ManifestError(f"{where}: shards[{i}] missing field '{key}'")
        _check_type(where, f"shards[{i}].{key}", s[key], types)
    name = s["name"]
    if not name.endswith(".tar") or "/" in name or "\\" in name or name.startswith("."):
        raise ManifestError(f"{where}: shards[{i}] has a bad name {name!r}")
    return ShardInfo(**{k: s[k] for k in _SHARD_FIELDS})


def _skipped(where: str, s) -> SkippedFile:
    if not (isinstance(s, dict) and isinstance(s.get("path"), str)
            and isinstance(s.get("reason"), str)):
        raise ManifestError(f"{where}: 'skipped' entries need string 'path' and 'reason'")
    return SkippedFile(path=s["path"], reason=s["reason"])


def _check_consistency(where: str, m: Manifest) -> None:
    if m.num_classes != len(m.classes) or m.num_classes != len(m.class_counts):
        raise ManifestError(f"{where}: num_classes={m.num_classes} but {len(m.classes)} "
                            f"class names and {len(m.class_counts)} class counts")
    if sum(m.class_counts) != m.num_samples:
        raise ManifestError(f"{where}: class_counts sum to {sum(m.class_counts)}, "
                            f"num_samples is {m.num_samples}")
    next_idx = 0
    for s in m.shards:
        if s.first_idx != next_idx or s.num_samples <= 0:
            raise ManifestError(f"{where}: shard {s.name} has first_idx={s.first_idx} and "
                                f"{s.num_samples} samples; expected first_idx={next_idx}")
        next_idx += s.num_samples
    if next_idx != m.num_samples:
        raise ManifestError(f"{where}: shards hold {next_idx} samples, "
                            f"num_samples is {m.num_samples}")
    if len({s.name for s in m.shards}) != len(m.shards):
        raise ManifestError(f"{where}: duplicate shard names")
