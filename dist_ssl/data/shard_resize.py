"""``make_shards write --resize SHORT_SIDE``: store images smaller, as JPEG (no torch).

A 112 px pre-training set does not need 500x375 (or 4000x3000) originals: decoding them is
most of a loader's CPU time. With ``--resize S`` an image whose shorter side exceeds S is
re-encoded as a JPEG (``--quality``, default 90) with its shorter side S and its aspect kept
(the longer side rounded); an image already at or below S is copied byte for byte (never
upsampled, never re-encoded). EXIF orientation is applied to the pixels before re-encoding
(the re-encoded file has no EXIF), 16-bit images are scaled to 8 bits, alpha is dropped and
palettes expanded as the loader's ``convert("RGB")`` would.

Quality: the JPEG is decoded at the smallest DCT scale that keeps at least twice the target
size (``Image.draft``, as PIL's ``thumbnail`` does), then resized with Lanczos.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ORIENTATION = 0x0112  # EXIF tag
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # more than 8 bits per pixel


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short_side`` and the aspect ratio kept."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _eight_bit(img: Image.Image) -> Image.Image:
    """"L" or "RGB" with 8 bits per channel (16-bit gray scaled by 1/257, not clipped)."""
    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") else 1.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L")
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
        if img.getexif().get(_ORIENTATION, 1) != 1:  # (exif_transpose copies even when not)
            img = ImageOps.exif_transpose(img)
        img = _eight_bit(img)
    out = img.resize(target_size(*img.size, short_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
