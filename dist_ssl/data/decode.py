"""Reading sample ranges out of WebDataset tars, and decoding one sample.

Decoding is two steps so crop plans can be drawn from the image size before any pixel is
decoded (:mod:`reduced_decode`): ``open_sample`` parses ``cls``, ``idx`` and the image header,
``load_image`` decodes, a JPEG optionally at 1/2, 1/4 or 1/8 scale. ``decode_sample`` is both.

The train/eval loader reads ``Range(shard, start, count)`` sub-ranges of shards (see
``stream_plan``), which webdataset's shard-level pipeline cannot express, so tars are read
here with :mod:`tarfile` on the seekable file: members before ``start`` and members of samples a
resumed run skips are passed over by header only (``tarfile`` seeks over their data), never
read or decoded. Members are grouped into samples by key exactly as webdataset does
(``webdataset.tariterators.base_plus_ext``: ``000000123.png`` -> key ``000000123``, ext ``png``).

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
from webdataset.tariterators import base_plus_ext

from dist_ssl.data.images import IMAGE_EXTS

log = logging.getLogger(__name__)

SKIPPED = object()  # placeholder for a sample whose bytes were not read (resume skip)
_IMAGE_EXTS = IMAGE_EXTS | {"jpeg", "tif"}


class SampleError(ValueError):
    """A sample whose image, ``cls`` or ``idx`` is missing or does not decode."""


def _groups(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) per sample, in tar order; non-files and unkeyed names are ignored.

    Uses ``tf.next()`` and drops tarfile's member cache as it goes, so memory stays flat on
    large shards (iterating a TarFile keeps every TarInfo).
    """
    key, members = None, []
    while (m := tf.next()) is not None:
        tf.members.clear()
        if not m.isfile():
            continue
        k, _ = base_plus_ext(m.name)
        if k is None:
            continue
        if k != key and members:
            yield key, members
            members = []
        key = k
        members.append(m)
    if members:
        yield key, members


def read_range(path: Path, start: int, count: int,
               wanted: Callable[[int], bool]) -> Iterator[Optional[dict]]:
    """Yield exactly ``count`` samples of ``path`` starting at sample ``start``.

    Each is ``{"__key__": key, ext: bytes, ...}``; ``SKIPPED`` where ``wanted(i)`` is false for
    the i-th sample of the range (its bytes are not read); ``None`` where it cannot be read.
    """
    done = 0
    try:
        with tarfile.open(path, "r:") as tf:
            for i, (key, members) in enumerate(_groups(tf)):
                if i < start:
                    continue
                if done == count:
                    break
                if not wanted(done):
                    yield SKIPPED
                else:
                    sample = {"__key__": key}
                    for m in members:
                        sample[base_plus_ext(m.name)[1]] = tf.extractfile(m).read()
                    yield sample
                done += 1
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


def open_sample(sample: Optional[dict]) -> OpenedSample:
    """Parse ``cls``, ``idx`` and the image header (cheap: ~0.06 ms for a JPEG), decode nothing.

    Raises :class:`SampleError` for a missing member or bytes PIL cannot identify. The image
    size is what crop plans are drawn from before choosing how to decode (``reduced_decode``).
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
    except KeyError as e:
        raise SampleError(f"sample {key}: missing member {e}") from None
    except Exception as e:  # noqa: BLE001 - any parser failure makes the sample corrupt
        raise SampleError(f"sample {key}: {_first_line(e)}") from None
    return OpenedSample(img, label, idx, sample[ext], key)


def load_image(opened: OpenedSample, reduce: int = 1) -> tuple[Image.Image, int]:
    """Decode the pixels, a JPEG at 1/``reduce`` scale (``reduce`` in 1, 2, 4, 8) via libjpeg's
    DCT scaling (``Image.draft``); other formats at full size. Returns (image, actual scale):
    pixel (x, y) of the result covers source pixels [x*s, (x+1)*s) x [y*s, (y+1)*s).
    Raises :class:`SampleError` if the bytes do not decode.
    """
    img, scale = opened.image, 1
    try:
        if reduce > 1 and img.format == "JPEG":
            w, h = img.size
            drafted = img.draft(None, (max(1, w // reduce), max(1, h // reduce)))
            if drafted is not None:
                scale = round(w / drafted[1][2])
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the sample corrupt
        raise SampleError(f"sample {opened.key}: {_first_line(e)}") from None
    return img, scale


def decode_sample(sample: Optional[dict]) -> tuple[Image.Image, int, int]:
    """(PIL image fully loaded, class id, instance id) or :class:`SampleError`."""
    opened = open_sample(sample)
    img, _ = load_image(opened)
    return img, opened.label, opened.idx


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
