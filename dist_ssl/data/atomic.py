"""Atomic file writes: write ``<path>.tmp``, fsync, then ``os.replace``.

A crash leaves at most a ``*.tmp`` file, never a half-written file under the final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name used while ``path`` is being written."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of ``data``.

    ``durable`` fsyncs before the rename (survives power loss, ~0.1 s on slow disks); state
    files that are merely redone when lost or torn pass ``durable=False``.
    """
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj, durable: bool = True) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (byte-stable for equal objects)."""
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), durable)
