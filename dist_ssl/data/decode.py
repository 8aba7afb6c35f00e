"""Reading sample ranges out of WebDataset tars, and decoding one sample.

Decoding is two steps so crop plans can be drawn from the image size before any pixel is
decoded (:mod:`reduced_decode`): ``open_sample`` parses ``cls``, ``idx`` and the image header,
``load_image`` decodes, a JPEG optionally at 1/2, 1/4 or 1/8 scale. ``decode_sample`` is both.

The train/eval loader reads ``Range(shard, start, count)`` sub-ranges of shards (see
``stream_plan``), which webdataset's shard-level pipeline cannot express, so tars are read
here with :mod:`tarfile` on the seekable file: members before ``start`` and members of samples a
resumed run skips are passed over by header only (``tarfile`` seeks over their data), never
read or decoded. Members are grouped into samples by key as webdataset does (``000000123.png``
-> key ``000000123``, ext ``png``), but only names make_shards writes count: any other member
(``../../evil.png``, a path, no id) is rejected and reported, never a sample of its own, so the
positions of the samples around it stay right (``sample_checks``).

Unreadable data never raises here: a sample that cannot be read (truncated tar, fewer samples
than the manifest says, I/O error) comes out as ``None`` and the loader replaces it.
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from PIL import Image

from dist_ssl.data.canonical_image import canonical_image, exif_orientation, upright_size
from dist_ssl.data.images import IMAGE_EXTS
from dist_ssl.data.sample_checks import DUPLICATE, member_key
from dist_ssl.errors import UserError, first_line

log = logging.getLogger(__name__)

SKIPPED = object()  # placeholder for a sample whose bytes were not read (resume skip)
_IMAGE_EXTS = IMAGE_EXTS | {"jpeg", "tif"}


class SampleError(UserError, ValueError):
    """A sample whose image, ``cls`` or ``idx`` is missing or does not decode."""


def _groups(tf: tarfile.TarFile,
            rejected: list[str]) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """(key, [(ext, member)]) per sample, in tar order; non-files are ignored and names that
    make_shards does not write are appended to ``rejected``.

    Uses ``tf.next()`` and drops tarfile's member cache as it goes, so memory stays flat on
    large shards (iterating a TarFile keeps every TarInfo).
    """
    key, members = None, []
    while (m := tf.next()) is not None:
        tf.members.clear()
        if not m.isfile():
            continue
        parts = member_key(m.name)
        if parts is None:
            rejected.append(m.name)
            continue
        if parts[0] != key and members:
            yield key, members
            members = []
        key = parts[0]
        members.append((parts[1], m))
    if members:
        yield key, members


def read_range(path: Path, start: int, count: int, wanted: Callable[[int], bool],
               on_reject: Callable[[str], None] = lambda name: None) -> Iterator[Optional[dict]]:
    """Yield exactly ``count`` samples of ``path`` starting at sample ``start``.

    Each is ``{"__key__": key, ext: bytes, ...}``; ``SKIPPED`` where ``wanted(i)`` is false for
    the i-th sample of the range (its bytes are not read); ``None`` where it cannot be read.
    ``on_reject(name)`` is called for each rejected member (see module doc) met inside the range
    (before one of its samples, or after its last when the range ends the shard).
    """
    done, rejected = 0, []
    try:
        with tarfile.open(path, "r:") as tf:
            for i, (key, members) in enumerate(_groups(tf, rejected)):
                if i < start:
                    rejected.clear()
                    continue
                if done == count:
                    break
                for name in rejected:
                    on_reject(name)
                rejected.clear()
                if not wanted(done):
                    yield SKIPPED
                else:
                    sample = {"__key__": key}
                    for ext, m in members:
                        if ext in sample:
                            sample[DUPLICATE] = ext
                        sample[ext] = tf.extractfile(m).read()
                    yield sample
                done += 1
            else:
                for name in rejected:
                    on_reject(name)
    except (OSError, tarfile.TarError, EOFError) as e:
        log.warning("%s: unreadable after sample %d of range [%d, +%d): %s",
                    path.name, start + done, start, count, e)
    if done < count:
        log.warning("%s: %d of %d samples from %d missing; they count as corrupt",
                    path.name, count - done, count, start)
    for _ in range(count - done):
        yield None


class OpenedSample(NamedTuple):
    """A sample whose header is parsed but whose pixels are not decoded yet."""

    image: Image.Image  # PIL image, size and mode known, nothing decoded (lazy)
    label: int
    idx: int
    data: bytes  # the encoded image bytes
    key: str
    size: tuple[int, int]  # (width, height) once upright (EXIF orientation): what crops are drawn from


def open_sample(sample: Optional[dict]) -> OpenedSample:
    """Parse ``cls``, ``idx`` and the image header (cheap: ~0.06 ms for a JPEG), decode nothing.

    Raises :class:`SampleError` for a missing member or bytes PIL cannot identify. The upright
    image size is what crop plans are drawn from before choosing how to decode (``reduced_decode``).
    """
    if sample is None:
        raise SampleError("unreadable sample")
    key = sample.get("__key__", "?")
    ext = next((e for e in sample if e.lower() in _IMAGE_EXTS), None)
    if ext is None:
        raise SampleError(f"sample {key}: no image member (have {sorted(sample)})")
    try:
        label = int(sample["cls"])
        idx = int(sample["idx"])
        img = Image.open(io.BytesIO(sample[ext]))
        size = upright_size(img)
    except KeyError as e:
        raise SampleError(f"sample {key}: missing member {e}") from None
    except Exception as e:  # noqa: BLE001 - any parser failure makes the sample corrupt
        raise SampleError(f"sample {key}: {first_line(e, max_chars=None)}") from None
    return OpenedSample(img, label, idx, sample[ext], key, size)


def load_image(opened: OpenedSample, reduce: int = 1) -> tuple[Image.Image, int]:
    """Decode the pixels, a JPEG at 1/``reduce`` scale (``reduce`` in 1, 2, 4, 8) via libjpeg's
    DCT scaling (``Image.draft``); other formats at full size; then upright and 8-bit
    (``canonical_image``). Returns (image, actual scale): pixel (x, y) of the result covers
    upright source pixels [x*s, (x+1)*s) x [y*s, (y+1)*s).
    Raises :class:`SampleError` if the bytes do not decode or cannot be made 8-bit.
    """
    img, scale = opened.image, 1
    try:
        if reduce > 1 and img.format == "JPEG":
            w, h = img.size
            if opened.size != img.size or exif_orientation(img) != 1:
                # a flip/rotation puts the partial last block of a reduced row first: pixel j of
                # the upright image would cover [j*s - d, (j+1)*s - d); keep s a divisor (d = 0)
                while reduce > 1 and (w % reduce or h % reduce):
                    reduce //= 2
            drafted = img.draft(None, (max(1, w // reduce), max(1, h // reduce)))
            if drafted is not None:
                scale = round(w / drafted[1][2])
        img.load()
        img = canonical_image(img)  # EXIF orientation, 16-bit / float -> 8 bit
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the sample corrupt
        raise SampleError(f"sample {opened.key}: {first_line(e, max_chars=None)}") from None
    return img, scale


def decode_sample(sample: Optional[dict]) -> tuple[Image.Image, int, int]:
    """(PIL image fully loaded, upright and 8-bit, class id, instance id) or :class:`SampleError`."""
    opened = open_sample(sample)
    img, _ = load_image(opened)
    return img, opened.label, opened.idx
