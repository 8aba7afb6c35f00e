"""Checks of one raw shard sample against the writer's layout and the manifest (no image decode).

``make_shards`` writes sample ``i`` of shard ``k`` (first id ``F_k`` in the manifest) as three
members named ``{F_k + i:09d}.cls``, ``.idx`` and ``.<image ext>`` (see ``shard_tar``). So every
id is known before the sample is read: its position. The loader checks each sample against it,
which catches, at the cost of two int parses per sample and with no state:

- a class id outside ``[0, num_classes)`` (would crash a classifier loss with an IndexError on one
  rank while the others wait in a collective);
- an instance id outside ``[0, N)``, or duplicated / misplaced (IDMM would silently train two
  images as one class, or a class no image has);
- a key that does not match its id.

A member whose name is not ``<digits>.<ext>`` (``../../evil.png``, ``/abs/x.png``, ``a/b.cls``,
``x.png``) is never written by make_shards: the reader rejects it without letting it form or
split a sample (:func:`member_key`), so the samples around it keep their positions and still
train; the loader counts it as a corrupt item. A sample with two members of one extension is
corrupt as a whole (which bytes would be the image?).
"""
from __future__ import annotations

import re
from typing import Optional

# What shard_tar writes: a zero-padded decimal id (9 digits, more past 10**9), one dot, a
# lower-case extension (cls, idx, jpg, png, tiff, ...). No "/", no "..", nothing absolute.
_MEMBER_NAME = re.compile(r"([0-9]{9,})\.([a-z0-9]+)")
_INT = re.compile(rb"-?[0-9]+")

EXPECTED_ID = "__expected_idx__"  # set by the loader on a raw sample: first_idx + position
DUPLICATE = "__duplicate__"  # set by the reader: an extension seen twice in one sample


class SampleMismatch(ValueError):
    """A sample that disagrees with the shard layout or the manifest (the loader skips it)."""


def member_key(name: str) -> Optional[tuple[str, str]]:
    """``(key, ext)`` of a member name make_shards could have written, else ``None``."""
    m = _MEMBER_NAME.fullmatch(name)
    return (m.group(1), m.group(2)) if m else None


def _int_member(sample: dict, key: str, ext: str) -> Optional[int]:
    raw = sample.get(ext)
    if raw is None:
        return None  # a missing member is reported by decode_sample
    if not isinstance(raw, bytes) or not _INT.fullmatch(raw.strip()):
        raise SampleMismatch(f"sample {key}: .{ext} is not an integer ({bytes(raw[:20])!r})")
    return int(raw)


def check_sample(sample: Optional[dict], num_classes: int, num_samples: int) -> None:
    """Raise :class:`SampleMismatch` if ``sample`` disagrees with the manifest (see module doc).

    ``sample`` is a raw ``read_range`` dict; ``None`` (unreadable) is left to ``decode_sample``.
    """
    if sample is None:
        return
    key = sample.get("__key__", "?")
    if DUPLICATE in sample:
        raise SampleMismatch(f"sample {key}: two .{sample[DUPLICATE]} members")
    cls = _int_member(sample, key, "cls")
    if cls is not None and not 0 <= cls < num_classes:
        raise SampleMismatch(f"sample {key}: class id {cls} outside [0, {num_classes}) "
                          f"of the manifest")
    idx = _int_member(sample, key, "idx")
    if idx is None:
        return
    if not 0 <= idx < num_samples:
        raise SampleMismatch(f"sample {key}: instance id {idx} outside [0, {num_samples}) "
                          f"of the manifest")
    expected = sample.get(EXPECTED_ID)
    if expected is not None and idx != expected:
        raise SampleMismatch(f"sample {key}: instance id {idx} where the shard layout has id "
                          f"{expected} (duplicated or misplaced id; run make_shards verify)")
    if key != f"{idx:09d}":
        raise SampleMismatch(f"sample key {key} does not match its instance id {idx}")
