"""Image checks and encodings shared by the shard writer and ``verify`` (PIL only, no torch).

Kept free of heavy imports: these functions run in spawned worker processes.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from dist_ssl.data.canonical_image import UnsupportedImage, canonical_image

# PIL format name -> file extension used in the shards (what webdataset decoders expect).
# MPO is a multi-picture JPEG (many camera files); its bytes decode as JPEG.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tiff", "WEBP": "webp",
               "GIF": "gif", "BMP": "bmp", "PPM": "ppm"}

IMAGE_EXTS = frozenset(_FORMAT_EXT.values())


def ext_for_format(fmt: str) -> str:
    """Normalised extension for a PIL format name: JPEG -> jpg, PNG -> png, else lower-case."""
    return _FORMAT_EXT.get(fmt, fmt.lower())


@dataclass(frozen=True)
class Probe:
    """Result of decoding one file once: ``ext`` and ``size`` if valid, else ``reason``."""

    ext: str | None
    size: int
    reason: str | None = None
    mtime_ns: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def validation_load(im: Image.Image) -> None:
    """Decode ``im`` to check it, a JPEG at 1/8 scale (``Image.draft``).

    libjpeg entropy-decodes every coefficient at any DCT scale, so truncated or corrupt data
    fails exactly as in a full decode (measured: the same verdict on 520 truncated and
    byte-flipped baseline and progressive JPEGs), while the inverse DCT, upsampling and colour
    conversion run on 1/64 of the pixels: about half the CPU of a full decode at q90.
    Other formats decode at full size.
    """
    im.draft(None, (1, 1))
    im.load()


def probe_image(path: str | os.PathLike) -> Probe:
    """Decode ``path`` with PIL as the loader will (open + :func:`validation_load` +
    ``canonical_image``) and report its real format.

    Never raises for bad input: an empty, unreadable, non-image or truncated file, or pixels the
    loader cannot bring to 8 bits (NaN floats, ...), gives a ``Probe`` with a one-line ``reason``. ``size`` lets the writer detect files that changed
    between validation and copying.
    """
    size = mtime_ns = -1
    try:
        st = os.stat(path)
        size, mtime_ns = st.st_size, st.st_mtime_ns
        if size == 0:
            return Probe(None, 0, "empty file", mtime_ns)
        with Image.open(path) as im:
            fmt = im.format
            validation_load(im)
            canonical_image(im)
    except UnidentifiedImageError:
        return Probe(None, size, "not an image (PIL cannot identify it)", mtime_ns)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        return Probe(None, size, f"unreadable: {e.strerror or type(e).__name__}", mtime_ns)
    except UnsupportedImage as e:
        return Probe(None, size, f"unsupported pixels: {e}", mtime_ns)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "bad file", not a crash
        # Truncated data raises OSError("image file is truncated ..."); others are corrupt.
        return Probe(None, size, f"cannot decode: {_one_line(e)}", mtime_ns)
    if not fmt:
        return Probe(None, size, "not an image (no format)", mtime_ns)
    return Probe(ext_for_format(fmt), size, None, mtime_ns)


def probe_path_job(path: str) -> tuple[str, Probe]:
    """Pool-friendly wrapper: returns ``(path, probe)`` so unordered results can be matched."""
    return path, probe_image(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png_gray(pixels: bytes, height: int, width: int) -> bytes:
    """Losslessly encode a uint8 ``[H, W]`` buffer as an 8-bit grayscale (mode L) PNG.

    A minimal encoder (IHDR, one IDAT with filter type 0 rows at zlib level 6, IEND): 3x
    faster than PIL's for 28x28 images, and its bytes do not depend on the Pillow version.
    """
    if len(pixels) != height * width:
        raise ValueError(f"expected {height * width} pixel bytes, got {len(pixels)}")
    rows = b"".join(b"\0" + pixels[r * width:(r + 1) * width] for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, 6)) + _png_chunk(b"IEND", b""))


def decode_check(data: bytes, ext: str) -> str | None:
    """Decode image bytes as ``verify`` does; return a reason string if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            validation_load(im)
            canonical_image(im)  # what the loader does with it
    except Exception as e:  # noqa: BLE001 - any decoder failure is a verify failure
        return f"does not decode ({_one_line(e)})"
    if fmt is None or ext_for_format(fmt) != ext:
        return f"format {fmt} does not match extension .{ext}"
    return None
