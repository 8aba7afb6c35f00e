"""The manifest of a checkpoint: size and SHA-256 of every file, written at save, checked at load.

Both passes are spread over the ranks (rank r takes files r, r + R, ...), so each reads about
1/R of the checkpoint. SHA-256 is hardware-accelerated (SHA-NI / ARMv8 crypto) in OpenSSL's
hashlib: 1.2 GB/s of CPU on the build machine, 0.9 s for the 1.04 GB checkpoint of a ViT-B/16
with AdamW in one process (benchmarks/checkpoint_hash.py).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

__all__ = ["HASH", "hash_file", "describe_files", "verify_files"]

HASH = "sha256"
_CHUNK = 4 << 20  # streamed: memory stays flat whatever the file size


def hash_file(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def describe_files(root: Path, rels: list[str], *, durable: bool = True) -> dict[str, dict]:
    """{rel: {"size", "sha256"}} of ``rels`` under ``root``; fsyncs each file first (``durable``)."""
    out = {}
    for rel in rels:
        f = root / rel
        if durable:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        out[rel] = {"size": f.stat().st_size, HASH: hash_file(f)}
    return out


def verify_files(root: Path, files: Mapping[str, Mapping], rels: list[str]) -> str | None:
    """The first problem with ``rels`` (missing, size, content) as one line naming the file, or None."""
    for rel in rels:
        f, want = root / rel, files[rel]
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: truncated or rewritten ({size} bytes, {want['size']} when saved)"
        if hash_file(f) != want[HASH]:
            return (f"{f}: content differs from the checkpoint manifest ({HASH} mismatch: corrupted on "
                    "disk or in a copy); restore the file or resume from another checkpoint")
    return None
