"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

IDX header: 2 zero bytes, a type byte (0x08 = uint8), a dim count, then big-endian uint32
sizes; the data follows. Images are ``[N, H, W]`` uint8, labels ``[N]`` uint8.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dist_ssl.data.errors import SourceError

# Fashion-MNIST class names, in label order (Xiao et al., 2017).
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# `--split` -> IDX file prefix.
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Read one uint8 IDX file into an array of its declared shape."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SourceError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SourceError(f"{path}: not a uint8 IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header != expected:
        raise SourceError(f"{path}: IDX header says {shape} ({expected} bytes) but file "
                          f"holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(root: Path, prefix: str, kind: str, dims: int) -> Path:
    """Find ``<prefix>-<kind>-idx<dims>-ubyte`` (or ``.`` before ``idx``), gzipped or not."""
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = root / f"{prefix}-{kind}{sep}idx{dims}-ubyte{suffix}"
            if p.is_file():
                return p
    raise SourceError(f"{root}: no {prefix}-{kind}-idx{dims}-ubyte[.gz] file")


def load_idx_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images [N, H, W] uint8, labels [N] uint8)`` for ``split`` (train/test)."""
    prefix = SPLIT_PREFIX[split]
    img_path = find_idx_file(root, prefix, "images", 3)
    lbl_path = find_idx_file(root, prefix, "labels", 1)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise SourceError(f"{img_path}: expected 3 dimensions, found {images.ndim}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise SourceError(f"{lbl_path}: {labels.shape} labels for {len(images)} images")
    return images, labels


def idx_class_names(root: Path, labels: np.ndarray) -> list[str]:
    """Fashion-MNIST names if the folder name says so and there are 10 labels, else "0".."K-1"."""
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if num_classes == 10 and "fashion" in root.resolve().name.lower():
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]
