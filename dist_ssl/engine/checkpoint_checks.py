"""What a checkpoint load checks before it reads any state: the trainer state record (format,
step, manifest), compatibility with this run (backend, world size, saved objects) and, for the
plain backends, the model's parameter names and shapes. Each check returns a one-line problem
naming the file, or None.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from accelerate.utils import DistributedType

from dist_ssl.engine.checkpoint_io import model_file, one_line
from dist_ssl.engine.checkpoint_manifest import HASH
from dist_ssl.parallel.accelerator import describe

__all__ = ["FORMAT_VERSION", "STEP_DIR", "record_problem", "compat_problem", "shape_problem"]

FORMAT_VERSION = 3
# why an older format cannot be read (each is refused with one line)
_OLD_FORMATS = {1: "accelerate's save_state: pickles that cannot be read safely",
                2: "rank-local state in three files per rank, now one object per rank"}
STEP_DIR = re.compile(r"^step_(\d{8,})$")


def _format_family(backend: str) -> str:
    """Backends whose checkpoints share a file layout (ZeRO partitions differ per stage)."""
    return backend if backend.startswith(("zero", "fsdp")) else "plain"


def _manifest_problem(files: Any) -> str | None:
    """The manifest must list plain relative paths inside the checkpoint with a size and a hash."""
    if not isinstance(files, dict):
        return "files: not a mapping"
    for rel, entry in files.items():
        if not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
            return f"files: {rel!r} is not a path inside the checkpoint"
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get(HASH), str)):
            return f"files: entry for {rel!r} lacks size / {HASH} (written by an older dist_ssl?)"
    return None


def record_problem(f: Path, dir_name: str, meta: dict, step: Any, files: Any) -> str | None:
    """The trainer state ``f`` itself: format version, step (>= 0, the directory's), manifest."""
    if meta.get("format_version") != FORMAT_VERSION:
        why = _OLD_FORMATS.get(meta.get("format_version"), "not a format this dist_ssl knows")
        return (f"{f}: format_version {meta.get('format_version')} != {FORMAT_VERSION} ({why}); "
                "resume=none starts over")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"{f}: step {step!r} is not a non-negative integer (edited by hand?)"
    m = STEP_DIR.match(dir_name)
    if m and int(m.group(1)) != step:
        return f"{f}: step {step} does not match the directory name {dir_name} (edited by hand?)"
    problem = _manifest_problem(files)
    return f"{f}: {problem}" if problem else None


def compat_problem(f: Path, meta: dict, accelerator, per_rank: Mapping[str, Any],
                   shared: Mapping[str, Any]) -> str | None:
    """The checkpoint described by ``f`` against this run's backend, world size and objects."""
    now = describe(accelerator)
    if _format_family(meta["backend"]) != _format_family(now["backend"]):
        return f"{f}: written by backend {meta['backend']}, this run uses {now['backend']}"
    if now["backend"].startswith("zero") and meta["num_processes"] != now["num_processes"]:
        return (f"{f}: ZeRO shards were written by {meta['num_processes']} processes, "
                f"this run has {now['num_processes']}")
    if sorted(per_rank) != sorted(meta.get("per_rank", [])):
        return f"{f}: per-rank objects {meta.get('per_rank')} != requested {sorted(per_rank)}"
    if sorted(shared) != sorted(meta.get("shared", [])):
        return f"{f}: shared objects {meta.get('shared')} != requested {sorted(shared)}"
    return None


def shape_problem(path: Path, accelerator) -> str | None:
    """Plain (single/DDP) checkpoints: compare safetensors header shapes with the live models."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None  # sharded formats: DCP / DeepSpeed report mismatches themselves (wrapped in load)
    from safetensors import safe_open

    for i, model in enumerate(accelerator._models):  # no public accessor for the prepared models
        f = path / model_file(i)
        live = accelerator.unwrap_model(model).state_dict()
        try:
            with safe_open(str(f), "pt") as sf:
                keys = set(sf.keys())
                shapes = {k: list(sf.get_slice(k).get_shape()) for k in keys}
        except Exception as exc:  # noqa: BLE001
            return f"{f}: unreadable ({type(exc).__name__}: {one_line(exc, 160)})"
        ptrs = {live[k].data_ptr() for k in keys & set(live) if live[k].numel()}
        tied = {k for k in set(live) - keys if live[k].numel() and live[k].data_ptr() in ptrs}
        if keys != set(live) - tied:  # save_model keeps one name of tied (shared) tensors
            diff = sorted(keys ^ (set(live) - tied))[:3]
            return f"{f}: parameter names differ from the model (e.g. {diff})"
        for k in sorted(keys):
            if shapes[k] != list(live[k].shape):
                return f"{f}: shape mismatch for {k!r}: checkpoint {shapes[k]} vs model {list(live[k].shape)}"
    return None
