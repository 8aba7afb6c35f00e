"""OUT_DIR bookkeeping for resumable shard writing.

State lives in ``OUT_DIR/.make_shards/``:
  ``args.json``     the arguments (written first: a later run with other arguments is refused)
  ``probes.jsonl``  one line per decoded input file (append-only; a resumed run never decodes
                    a file again unless its size or mtime changed)
  ``plan.json``     the validated, shuffled sample list (id = position) and the skipped files
  ``done/<shard>.json``  written after each shard's atomic rename: sha256, size, mtime_ns

A shard counts as finished when its done record exists and the tar's size and mtime_ns still
match it (cheap; ``verify`` re-hashes). Only files named by this module are ever deleted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from dist_ssl.atomic import TMP_SUFFIX, atomic_write_json
from dist_ssl.data.errors import ManifestError, OutDirError
from dist_ssl.data.images import Probe
from dist_ssl.data.manifest import FINGERPRINT_FIELDS, MANIFEST_NAME, Manifest, load_manifest
from dist_ssl.data.shard_tar import DONE_DIR, STATE_DIR, done_record_path

logger = logging.getLogger(__name__)

_FLAG = {"source": "SOURCE", "split": "--split", "subset": "--subset", "seed": "--seed",
         "samples_per_shard": "--samples-per-shard", "resize": "--resize", "quality": "--quality"}


def _ours(name: str) -> bool:
    """Top-level entries this tool writes (and may delete with --overwrite)."""
    base = name[: -len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else name
    return base in (MANIFEST_NAME, STATE_DIR) or (base.startswith("shard-")
                                                  and base.endswith(".tar"))


def _show(value) -> str:
    return "(none)" if value is None else str(value)


@contextlib.contextmanager
def locked(out_dir: Path):
    """Exclusive lock on OUT_DIR itself (flock on the directory; no lock file to leave)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirError(f"{out_dir}: another make_shards run is writing here") from None
        yield
    finally:
        os.close(fd)


class OutDirState:
    """Reads and writes the state files of one OUT_DIR."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.state_dir = out_dir / STATE_DIR

    # ---- arguments -------------------------------------------------------------------
    def recorded_args(self) -> dict | None:
        """Arguments of the dataset already in OUT_DIR (state first, else the manifest)."""
        path = self.state_dir / "args.json"
        if path.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                return json.loads(path.read_text())
        with contextlib.suppress(ManifestError):
            return load_manifest(self.out_dir).args()
        return None

    def claim(self, args: dict, overwrite: bool) -> None:
        """Refuse an OUT_DIR holding other work (unless overwrite), then record ``args``."""
        old = self.recorded_args()
        if overwrite or (old is not None and old != args and not self._has_output()):
            self.remove_ours()  # (a run that failed before planning left only caches)
        elif old is not None and old != args:
            key = next(k for k in FINGERPRINT_FIELDS if old.get(k) != args.get(k))
            raise OutDirError(f"{self.out_dir} was written with different arguments: "
                              f"{_FLAG[key]} was {_show(old.get(key))}, now {_show(args.get(key))}; "
                              f"pass --overwrite to replace it")
        elif old is None and any(not e.name.endswith(TMP_SUFFIX) and e.name != STATE_DIR
                                 for e in os.scandir(self.out_dir)):
            raise OutDirError(f"{self.out_dir} is not empty and holds no make_shards dataset; "
                              f"choose an empty directory or pass --overwrite")
        self.remove_tmp()
        (self.state_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_dir / "args.json", args, durable=False)

    def _has_output(self) -> bool:
        """Whether anything worth protecting exists: a plan, a shard or a manifest."""
        return ((self.state_dir / "plan.json").exists() or (self.out_dir / MANIFEST_NAME).exists()
                or any(self.out_dir.glob("shard-*.tar")))

    def remove_ours(self) -> None:
        for e in os.scandir(self.out_dir):
            if not _ours(e.name):
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)

    def remove_tmp(self) -> None:
        """Delete ``*.tmp`` left by a crash (shards, manifest, state files)."""
        for d in (self.out_dir, self.state_dir, self.state_dir / DONE_DIR):
            if d.is_dir():
                for e in os.scandir(d):
                    if e.name.endswith(TMP_SUFFIX) and (d != self.out_dir or _ours(e.name)):
                        os.unlink(e.path)

    # ---- probes cache ----------------------------------------------------------------
    def load_probes(self) -> dict[str, Probe]:
        probes = {}
        path = self.state_dir / "probes.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:  # the last line may be cut by a crash
                    ref, ext, size, reason, mtime_ns = json.loads(line)
                except (ValueError, TypeError):
                    continue
                probes[ref] = Probe(ext, size, reason, mtime_ns)
        return probes

    def probe_log(self):
        """Append-mode handle for new probe lines (call :func:`log_probe`)."""
        return open(self.state_dir / "probes.jsonl", "a", encoding="utf-8")

    # ---- plan ------------------------------------------------------------------------
    def load_plan(self) -> dict | None:
        path = self.state_dir / "plan.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("%s is unreadable; planning again", path)
            return None

    def save_plan(self, plan: dict) -> None:
        atomic_write_json(self.state_dir / "plan.json", plan, durable=False)

    # ---- shards ----------------------------------------------------------------------
    def finished(self, name: str, first_idx: int, num_samples: int) -> dict | None:
        """The done record of a finished shard, or None if it must be (re)written."""
        try:
            rec = json.loads(done_record_path(self.out_dir, name).read_text())
            st = os.stat(self.out_dir / name)
        except (OSError, json.JSONDecodeError):
            return None
        same = (rec.get("size"), rec.get("mtime_ns"), rec.get("first_idx"),
                rec.get("num_samples")) == (st.st_size, st.st_mtime_ns, first_idx, num_samples)
        return rec if same else None

    def complete_manifest(self) -> Manifest | None:
        """The manifest if present, readable and (per done records) all shards finished."""
        try:
            m = load_manifest(self.out_dir)
        except ManifestError:
            return None
        have_state = (self.state_dir / DONE_DIR).is_dir()
        for s in m.shards:
            if have_state and self.finished(s.name, s.first_idx, s.num_samples) is None:
                return None
            if not have_state and not (self.out_dir / s.name).is_file():
                raise OutDirError(f"{self.out_dir / s.name} is missing and there is no writer "
                                  f"state to rebuild it; pass --overwrite")
        return m


def log_probe(handle, ref: str, probe: Probe) -> None:
    handle.write(json.dumps([ref, probe.ext, probe.size, probe.reason, probe.mtime_ns]) + "\n")
