"""Writing one WebDataset shard deterministically (runs in worker processes; no torch).

A sample with id ``i`` is three consecutive tar members, always in this order::

    {i:09d}.cls   class index, ASCII decimal
    {i:09d}.idx   instance id, ASCII decimal
    {i:09d}.<ext> image bytes: input files copied byte for byte (ext from the decoded
                  format: jpg, png, ...); IDX rows encoded losslessly as mode-L PNG;
                  with ``resize``, images larger than that re-encoded as JPEG
                  (:mod:`shard_resize`)

Members have mtime 0, uid/gid 0, empty owner names and mode 0644 (ustar format), so the
same samples always give a byte-identical tar.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dist_ssl.atomic import atomic_write_json, tmp_path
from dist_ssl.data.errors import DataError
from dist_ssl.data.images import encode_png_gray
from dist_ssl.data.shard_resize import resize_image

STATE_DIR = ".make_shards"  # writer state inside OUT_DIR (args, probes, plan, done records)
DONE_DIR = "done"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def done_record_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / STATE_DIR / DONE_DIR / (name + ".json")


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (kept compact: no per-sample objects).

    ``rows``: the plan's ``[ref, label, ext, size]`` for ids ``first_idx, first_idx+1, ...``.
    File sources: ``ref`` is a path under ``root``; ``size`` is from validation (a change is
    an error). IDX: ``pixels`` holds the rows' images as one ``[n, H, W]`` uint8 block.
    ``resize``/``quality``: store images with a larger shorter side as JPEGs of that side.
    ``crash`` is a test hook (see ``shard_writer``).
    """

    out_dir: str
    index: int
    first_idx: int
    rows: list
    root: str | None = None
    pixels: bytes | None = None
    image_hw: tuple[int, int] = (0, 0)
    resize: int | None = None
    quality: int = 90
    crash: bool = False


class _SimulatedCrash(RuntimeError):
    """Raised by the ``crash`` test hook; not a DataError, so the CLI shows a traceback."""


class _HashingWriter:
    """File wrapper that hashes what tarfile writes, so the shard is never re-read."""

    def __init__(self, f):
        self._f, self._pos, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        self._pos += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._pos


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _resized(task: ShardTask, ref: str, ext: str, data: bytes) -> tuple[str, bytes]:
    try:
        small = resize_image(data, task.resize, task.quality)
    except Exception as e:  # noqa: BLE001 - it decoded when validated: the file changed
        raise DataError(f"cannot resize {os.path.join(task.root or '', ref)} ({e}); it was valid "
                        f"when planned: restore it or rerun with --overwrite") from None
    return (ext, data) if small is None else ("jpg", small)


def _image(task: ShardTask, i: int) -> tuple[str, bytes]:
    """Extension and bytes of the i-th image of the task (copied, or resized if asked)."""
    ext, data = _source_image(task, i)
    return _resized(task, task.rows[i][0], ext, data) if task.resize else (ext, data)


def _source_image(task: ShardTask, i: int) -> tuple[str, bytes]:
    ref, _, ext, size = task.rows[i]
    if task.pixels is not None:
        h, w = task.image_hw
        return "png", encode_png_gray(task.pixels[i * h * w:(i + 1) * h * w], h, w)
    path = os.path.join(task.root, ref)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read source file {path} ({e.strerror}); it was valid when "
                        f"planned: restore it or rerun with --overwrite") from None
    if len(data) != size:
        raise DataError(f"source file changed since it was validated: {path} "
                        f"({size} -> {len(data)} bytes); rerun with --overwrite")
    return ext, data


def _add_sample(tar: tarfile.TarFile, task: ShardTask, i: int) -> None:
    idx, label = task.first_idx + i, task.rows[i][1]
    key = f"{idx:09d}"
    ext, data = _image(task, i)
    for suffix, payload in (("cls", str(label).encode()), ("idx", str(idx).encode()),
                            (ext, data)):
        tar.addfile(_member(f"{key}.{suffix}", len(payload)), io.BytesIO(payload))


def write_shard(task: ShardTask) -> dict:
    """Write ``shard-<index>.tar`` atomically, then its done record; return the record."""
    name = shard_name(task.index)
    final = Path(task.out_dir) / name
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            hw = _HashingWriter(f)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(len(task.rows)):
                    if task.crash and i == len(task.rows) // 2:
                        raise _SimulatedCrash(f"DIST_SSL_SHARDS_FAIL_AFTER: simulated crash "
                                              f"while writing {name}")
                    _add_sample(tar, task, i)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except _SimulatedCrash:
        raise  # leave the partial .tmp behind, exactly as a killed process would
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on device ({errno.errorcode[e.errno]}) writing {name} "
                            f"in OUT_DIR {task.out_dir}: free space or choose another OUT_DIR, "
                            f"then rerun the same command (finished shards are kept)") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = os.stat(final)
    record = {"name": name, "num_samples": len(task.rows), "sha256": hw.sha256.hexdigest(),
              "first_idx": task.first_idx, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # Not fsynced: a lost or torn record only means the shard is written again.
    atomic_write_json(done_record_path(task.out_dir, name), record, durable=False)
    return record
