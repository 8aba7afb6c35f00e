"""A decoded image as a viewer shows it: EXIF orientation applied, 8 bits per channel.

``make_shards`` copies image files byte for byte, so this runs where images are decoded: in the
loader (``decode_sample``) and in the sharding tool's validation decode and ``verify``
(``images.py``), so a file this function refuses is skipped at sharding time, with its reason in
the manifest, instead of at every epoch.

Orientation: cameras store pixels as the sensor saw them plus an EXIF ``Orientation`` tag (1-8);
``PIL.ImageOps.exif_transpose`` turns the pixels upright (as every viewer and torchvision's
``decode_jpeg(apply_exif_orientation=True)`` do). In place: no copy when there is nothing to do.

Bit depth. The loader's augmentations and ``convert("RGB"/"L")`` are 8-bit; PIL's conversion of
high-depth modes clips instead of scaling (a 16-bit PNG becomes all white, a [0, 1] float TIFF
all black), so they are scaled here first:

- 16-bit integer (``I;16``, ``I;16B``, ...; 16-bit PNG/TIFF grayscale): ``v >> 8`` (65535 -> 255,
  ``257 * k`` -> ``k``). 16-bit RGB(A) files already decode to 8-bit RGB(A) in PIL.
- 32-bit integer (``I``): values in [0, 65535] are taken as 16-bit (``v >> 8``); other values
  are refused (their scale is unknown).
- 32-bit float (``F``): NaN or inf is refused; values in [0, 1] are scaled by 255 (the float
  image convention); values in [0, 255] are kept; anything else is stretched linearly from the
  image's own [min, max] to [0, 255] (a constant image becomes 0). Rounded to the nearest int.
- A mode that cannot be converted to RGB (``LAB``, ``La``, ...) is refused.

Refusals raise :class:`UnsupportedImage` (a ``ValueError``) with a one-line reason.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Modes PIL converts to "L" and "RGB" correctly (what make_views does next): passed through.
_EIGHT_BIT = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK",
                        "YCbCr", "HSV"})


class UnsupportedImage(ValueError):
    """An image whose pixels cannot be brought to 8 bits without guessing; one-line reason."""


# Where PIL's getexif() finds an Orientation: these info keys, or TIFF tags (``tag_v2``). Most
# dataset files have none of them, and skipping getexif() there saves ~15 us of CPU per small PNG
# (a fifth of decoding a 28x28 one); a 640x427 JPEG with EXIF pays 50-100 us (2-4% of its decode).
_ORIENTATION_KEYS = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})


def canonical_image(img: Image.Image) -> Image.Image:
    """``img`` (loaded) upright and 8-bit (see module doc); may return ``img`` itself."""
    if exif_orientation(img) != 1:
        ImageOps.exif_transpose(img, in_place=True)
    return to_8bit(img)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 = upright, 1-8), read from the header only (no decode)."""
    if _ORIENTATION_KEYS.isdisjoint(img.info) and not hasattr(img, "tag_v2"):
        return 1
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: PIL's exif_transpose ignores it too
        return 1
    return value if 1 <= value <= 8 else 1


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` after ``canonical_image``: orientations 5-8 turn it by 90 deg."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def to_8bit(img: Image.Image) -> Image.Image:
    """An 8-bit-per-channel version of ``img`` (see the module doc for the rules)."""
    mode = img.mode
    if mode in _EIGHT_BIT:
        return img
    if mode.startswith("I;16"):
        return _gray(np.asarray(img).astype(np.uint16) >> 8)
    if mode == "I":
        v = np.asarray(img)
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise UnsupportedImage(f"32-bit integer pixels in [{v.min()}, {v.max()}], outside the "
                                   f"16-bit range [0, 65535]: save the image as 8 or 16 bit")
        return _gray(v >> 8)
    if mode == "F":
        return _gray(_float_to_8bit(np.asarray(img, dtype=np.float64)))
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise UnsupportedImage(f"pixel mode {mode} cannot be converted to RGB ({e})") from None


def _float_to_8bit(v: np.ndarray) -> np.ndarray:
    if not np.isfinite(v).all():
        raise UnsupportedImage("float pixels with NaN or inf values")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        v = v * 255
    elif lo < 0 or hi > 255:
        v = (v - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.rint(v)


def _gray(v: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(v, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
