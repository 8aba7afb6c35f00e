"""Atomic file writes: write ``<path>.tmp``, fsync, then ``os.replace``.

A crash leaves at most a ``*.tmp`` file, never a half-written file under the final name. One
module for every layer (data, config, models, engine, eval, tools), so it imports nothing else
of dist_ssl. The temporary name is fixed per target: each file has one writer (rank 0 or the
owning process), and the sharding tool finds crash leftovers by the suffix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name used while ``path`` is being written."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: str | os.PathLike, write_tmp: Callable[[Path], None], durable: bool = True) -> Path:
    """``write_tmp(tmp)`` writes the whole file at the temporary name; then fsync (``durable``),
    rename over ``path`` and fsync the directory. Any error removes the temporary file."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write_tmp(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of ``data``.

    ``durable`` fsyncs before the rename (survives power loss, ~0.1 s on slow disks); state
    files that are merely redone when lost or torn pass ``durable=False``.
    """
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None,
                            durable: bool = True) -> Path:
    """Write named tensors as one safetensors file, atomically (contiguous CPU copies as needed)."""
    from safetensors.torch import save_file  # torch-free callers of this module stay torch-free

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata), durable)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj, durable: bool = True) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (byte-stable for equal objects)."""
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(path, text, durable)
