"""``make_shards write --resize SHORT_SIDE``: store images smaller, as JPEG (no torch).

A 112 px pre-training set does not need 500x375 (or 4000x3000) originals: decoding them is
most of a loader's CPU time. With ``--resize S`` an image whose shorter side exceeds S is
re-encoded as a JPEG (``--quality``, default 90) with its shorter side S and its aspect kept
(the longer side rounded); an image already at or below S is copied byte for byte (never
upsampled, never re-encoded). EXIF orientation is applied to the pixels before re-encoding
(the re-encoded file has no EXIF), 16-bit and float images are scaled to 8 bits as the loader does (``canonical_image``), alpha is dropped and
palettes expanded as the loader's ``convert("RGB")`` would.

Quality: the JPEG is decoded at the smallest DCT scale that keeps at least twice the target
size (``Image.draft``, as PIL's ``thumbnail`` does), then resized with Lanczos.
"""
from __future__ import annotations

import io

from PIL import Image

from dist_ssl.data.canonical_image import canonical_image

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side`` and the aspect ratio kept."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _eight_bit(img: Image.Image) -> Image.Image:
    """"L" or "RGB" with 8 bits per channel, upright: the loader's ``canonical_image`` (EXIF
    orientation, 16-bit and float scaled, not clipped), then gray or colour."""
    img = canonical_image(img)
    mode = "L" if img.mode in _GRAY_MODES else "RGB"
    return img if img.mode == mode else img.convert(mode)


def resize_image(data: bytes, short_side: int, quality: int) -> bytes | None:
    """JPEG bytes of the image in ``data`` with its shorter side ``short_side``, or None when
    it is already at or below that size (the caller keeps the original bytes)."""
    with Image.open(io.BytesIO(data)) as img:
        if min(img.size) <= short_side:
            return None
        want = target_size(*img.size, short_side)
        img.draft(None, (want[0] * 2, want[1] * 2))  # JPEG: DCT-scaled decode, else no-op
        img.load()
        img = _eight_bit(img)
    out = img.resize(target_size(*img.size, short_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
