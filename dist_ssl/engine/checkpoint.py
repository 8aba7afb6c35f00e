"""Atomic, pruned training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout (``output_dir`` must be one filesystem that every rank sees)::

    output_dir/checkpoints/step_00001234/
        COMPLETE                  written last; a directory without it is never loaded
        trainer_state.json        step, meta (backend, world size, ...), the engine's JSON state and
                                  a manifest {file: size} that load checks (missing / truncated)
        ...accelerate files       DDP/single: model.safetensors, optimizer.bin, scheduler.bin
                                  FSDP2: pytorch_model_fsdp_0/ + optimizer_0/ (DCP shards, every rank)
                                  DeepSpeed: pytorch_model/ (ZeRO shards per rank), latest
                                  all: random_states_<rank>.pkl (python/numpy/torch RNG per rank)
        rank_local_<name>_<rank>.pt   objects that are not data-parallel (``per_rank=``)

Save: every rank writes into ``.tmp_step_<n>_<rand>/`` (same directory, so the final
``os.rename`` is atomic), barrier, rank 0 writes the manifest and COMPLETE and renames, barrier,
rank 0 prunes.
A crash at any point leaves the previous checkpoints untouched; ``latest()`` skips temp and
incomplete directories.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate.utils import DistributedType

from dist_ssl.parallel.accelerator import describe
from dist_ssl.parallel.collectives import all_gather_object, broadcast_object

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE", "TRAINER_STATE", "CRASH_ENV"]

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CRASH_ENV = "DIST_SSL_CKPT_CRASH_AFTER_MODEL"  # test hook: os._exit(1) after the model files are written
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_STALE = re.compile(r"^\.(tmp|old)_step_\d+_[0-9a-f]+$")


def _format_family(backend: str) -> str:
    """Backends whose checkpoints share a file layout (ZeRO partitions differ per stage)."""
    return backend if backend.startswith(("zero", "fsdp")) else "plain"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _file_problem(path: Path) -> str | None:
    """Cheap integrity check (headers / zip directory only, no full read); None when it looks fine."""
    try:
        size = path.stat().st_size
        if size == 0 and path.name != COMPLETE:
            return "empty file"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):  # validates the header and that offsets cover the file
                pass
        elif path.suffix in (".bin", ".pt", ".pkl", ".pth"):  # torch.save output is a zip archive
            with zipfile.ZipFile(path) as zf:
                end = max(i.header_offset + i.compress_size for i in zf.infolist())
                if end > size:
                    return "truncated zip archive"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - every failure here means "unreadable"
        return f"unreadable ({type(exc).__name__}: {_one_line(exc, 160)})"
    return None


class CheckpointManager:
    """Writes ``step_%08d`` checkpoints atomically under ``output_dir/checkpoints`` and keeps the last k.

    ``keep_last=0`` keeps every checkpoint. All methods that take an accelerator are collective:
    every rank must call them.
    """

    def __init__(self, output_dir: Path, keep_last: int = 3):
        if keep_last < 0:
            raise ValueError(f"keep_last: must be >= 0 (0 = keep all), got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """``auto`` -> latest complete checkpoint or None; ``none``/empty -> None; else that checkpoint dir."""
        key = (resume or "none").strip()
        if key.lower() == "none":
            return None
        if key.lower() == "auto":
            return self.latest()
        path = Path(key).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: resume checkpoint does not exist")
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path / COMPLETE}: missing, the checkpoint is incomplete (crashed save?)")
        return path

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, accelerator, state: Mapping[str, Any], *, per_rank: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``step_<step>`` atomically (collective). ``state`` must be JSON-able.

        ``per_rank`` maps names to objects with ``state_dict()`` that differ per rank and are not
        known to the accelerator (e.g. a model-parallel weight shard and its optimizer).
        A write error on any rank raises CheckpointError on every rank (no rank is left waiting).
        """
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        per_rank = dict(per_rank or {})
        meta = dict(describe(accelerator), format_version=FORMAT_VERSION, per_rank=sorted(per_rank),
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record = {"step": step, "meta": meta, "state": dict(state)}
        json.dumps(record)  # not JSON-able -> TypeError on every rank, before anything is written
        main, final = accelerator.is_main_process, self.path_for(step)
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / broadcast_object(f".tmp_{final.name}_{secrets.token_hex(4)}" if main else None)

        failure = self._write_all_ranks(tmp, accelerator, per_rank)
        failures = [f for f in all_gather_object(failure) if f]  # doubles as the barrier before COMPLETE
        if not failures and main:
            try:
                self._finalize(tmp, final, record)
            except OSError as exc:
                failures = [f"{final}: cannot finish the checkpoint ({_one_line(exc)})"]
        failures = broadcast_object(failures)  # doubles as the barrier after the rename
        if failures:
            raise CheckpointError(failures[0])
        if main:
            self._prune()
        logger.info("checkpoint saved: %s", final)
        return final

    @staticmethod
    def _write_all_ranks(tmp: Path, accelerator, per_rank: Mapping[str, Any]) -> str | None:
        """Every rank's share of the files; a one-line problem or None."""
        rank = accelerator.process_index
        try:
            accelerator.save_state(str(tmp))  # collective; FSDP2/DeepSpeed write shards from every rank
            if os.environ.get(CRASH_ENV) == "1":
                logger.error("%s=1: simulating a crash in the middle of a checkpoint save", CRASH_ENV)
                os._exit(1)
            for name, obj in per_rank.items():
                torch.save(obj.state_dict(), tmp / f"rank_local_{name}_{rank:05d}.pt")
        except Exception as exc:  # noqa: BLE001 - reported on every rank by the caller
            return f"{tmp}: rank {rank} could not write its files ({type(exc).__name__}: {_one_line(exc, 200)})"
        return None

    def _finalize(self, tmp: Path, final: Path, record: dict) -> None:
        """Rank 0, after every rank wrote: manifest, fsync, COMPLETE last, atomic rename."""
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
                files[f.relative_to(tmp).as_posix()] = f.stat().st_size
        record["files"] = files  # load checks presence + size of each: catches truncation in any format
        _write_durable(tmp / TRAINER_STATE, json.dumps(record, indent=2, sort_keys=True))
        _write_durable(tmp / COMPLETE, f"step {record['step']}\n")
        self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # same step saved again: move the old one aside, never merge into it
            old = final.with_name(f".old_{final.name}_{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(self.root)

    def _prune(self) -> None:
        done = self.complete()
        doomed = done[: -self.keep_last] if self.keep_last else []
        for p in self.root.iterdir():  # leftovers of crashed saves / deletes (one writer per run dir)
            if _STALE.match(p.name) or (_STEP_DIR.match(p.name) and p.is_dir() and not (p / COMPLETE).exists()):
                doomed.append(p)
        for p in doomed:
            (p / COMPLETE).unlink(missing_ok=True)  # first, so a half-deleted dir is never "complete"
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, accelerator, *, per_rank: Mapping[str, Any] | None = None) -> dict:
        """Restore everything ``save`` wrote (collective); returns ``{"step": ..., **state}``.

        Raises CheckpointError on every rank, naming the file, when the checkpoint is incomplete,
        corrupt (truncated / unreadable) or incompatible (other backend, shapes).
        """
        path = Path(path)
        per_rank = dict(per_rank or {})
        try:
            problem = self._precheck(path, accelerator, per_rank)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the all_gather below
            problem = f"{path}: cannot be checked ({type(exc).__name__}: {_one_line(exc, 160)})"
        problems = [p for p in all_gather_object(problem) if p]  # same verdict on every rank: no hang
        if problems:
            raise CheckpointError(problems[0])
        record = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        try:
            accelerator.load_state(str(path))
        except Exception as exc:
            why = f"{type(exc).__name__}: {_one_line(exc)}"
            raise CheckpointError(f"{path}: cannot restore into this run ({why})") from exc
        rank, saved_world = accelerator.process_index, record["meta"]["num_processes"]
        for name, obj in per_rank.items():
            if saved_world != accelerator.num_processes:  # re-shard from every saved rank's file
                files = [path / f"rank_local_{name}_{r:05d}.pt" for r in range(saved_world)]
                try:  # mmap: only the rows this rank takes are read, never every rank's full share
                    obj.load_all_ranks([torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                                        for f in files])
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot re-shard {name!r} from {saved_world} to "
                                          f"{accelerator.num_processes} processes ({_one_line(exc)})") from exc
                continue
            f = path / f"rank_local_{name}_{rank:05d}.pt"
            try:
                obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot restore {name!r} ({_one_line(exc)})") from exc
        logger.info("checkpoint loaded: %s (step %d)", path, record["step"])
        return {**record["state"], "step": record["step"]}

    def _precheck(self, path: Path, accelerator, per_rank: Mapping[str, Any]) -> str | None:
        """This rank's share of the cheap checks; a one-line problem or None."""
        if not path.is_dir():
            return f"{path}: checkpoint directory does not exist"
        if not (path / COMPLETE).is_file():
            return f"{path / COMPLETE}: missing, the checkpoint is incomplete (crashed save?)"
        try:
            record = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
            meta = record["meta"]
            _ = record["step"], record["state"], record["files"]
        except Exception as exc:  # noqa: BLE001
            return f"{path / TRAINER_STATE}: unreadable ({type(exc).__name__}: {_one_line(exc, 160)})"
        problem = self._compat_problem(path, meta, accelerator, per_rank)
        if problem:
            return problem
        rank, world = accelerator.process_index, accelerator.num_processes
        files = sorted(record.get("files", {}).items())
        for rel, size in files[rank::world]:  # spread the checks over the ranks (stat + headers only)
            f = path / rel
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: truncated or rewritten ({f.stat().st_size} bytes, {size} when saved)"
            problem = _file_problem(f)
            if problem:
                return f"{f}: {problem}"
        if meta["num_processes"] == world and not (path / f"random_states_{rank}.pkl").is_file():
            return f"{path / f'random_states_{rank}.pkl'}: missing"  # accelerate would skip it silently
        saved_world = meta["num_processes"]
        for name, obj in per_rank.items():
            if saved_world != world and not hasattr(obj, "load_all_ranks"):
                return (f"{path}: {name!r} was saved by {saved_world} processes and cannot be re-sharded "
                        f"for {world}; resume with {saved_world} processes")
            for r in (range(saved_world) if saved_world != world else [rank]):
                f = path / f"rank_local_{name}_{r:05d}.pt"
                if not f.is_file():
                    return f"{f}: missing (checkpoint written by {saved_world} processes, now {world})"
        return self._shape_problem(path, accelerator)

    @staticmethod
    def _compat_problem(path: Path, meta: dict, accelerator, per_rank: Mapping[str, Any]) -> str | None:
        if meta.get("format_version") != FORMAT_VERSION:
            return f"{path / TRAINER_STATE}: format_version {meta.get('format_version')} != {FORMAT_VERSION}"
        now = describe(accelerator)
        if _format_family(meta["backend"]) != _format_family(now["backend"]):
            return f"{path / TRAINER_STATE}: written by backend {meta['backend']}, this run uses {now['backend']}"
        if now["backend"].startswith("zero") and meta["num_processes"] != now["num_processes"]:
            return (f"{path / TRAINER_STATE}: ZeRO shards were written by {meta['num_processes']} processes, "
                    f"this run has {now['num_processes']}")
        if sorted(per_rank) != sorted(meta.get("per_rank", [])):
            return f"{path / TRAINER_STATE}: per-rank objects {meta.get('per_rank')} != requested {sorted(per_rank)}"
        return None

    @staticmethod
    def _shape_problem(path: Path, accelerator) -> str | None:
        """Plain (single/DDP) checkpoints: compare safetensors header shapes with the live models."""
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None  # sharded formats: DCP / DeepSpeed report mismatches themselves (wrapped in load)
        from safetensors import safe_open

        for i, model in enumerate(accelerator._models):  # no public accessor for the prepared models
            f = path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not f.is_file():
                continue
            live = model.state_dict()  # save_state stores the wrapped keys (DDP: "module." prefix)
            if _file_problem(f):  # another rank reports it (the header checks are spread over ranks)
                continue
            with safe_open(str(f), "pt") as sf:
                keys = set(sf.keys())
                if keys != set(live):
                    diff = sorted(keys ^ set(live))[:3]
                    return f"{f}: parameter names differ from the model (e.g. {diff})"
                for k in sorted(keys):
                    saved = list(sf.get_slice(k).get_shape())
                    if saved != list(live[k].shape):
                        return f"{f}: shape mismatch for {k!r}: checkpoint {saved} vs model {list(live[k].shape)}"
        return None
