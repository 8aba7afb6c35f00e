"""Atomic, verified, pruned training checkpoints from which nothing is unpickled with arbitrary globals.

Layout (``output_dir`` must be one filesystem that every rank sees)::

    output_dir/checkpoints/step_00001234/
        COMPLETE                  written last; a directory without it is never loaded
        trainer_state.json        step, meta (backend, world size, ...), the engine's JSON state and
                                  the manifest {file: {size, sha256}} that load verifies
        model / optimizer / scheduler files of the backend (engine/checkpoint_io.py)
        rng_state_<rank>.safetensors  python / numpy / torch / CUDA RNG of each rank
        shared_<name>.pt          stateful objects that are the same on every rank (method buffers,
                                  EMA): rank 0 writes them (engine/checkpoint_stateful.py)
        <name>_<rank>.pt          stateful objects with ``per_rank = True``, every rank its own: the
                                  model-parallel state (rank_local_<rank>.pt, parallel/rank_local.py)

Trust model: reading a checkpoint never runs code from it. JSON and safetensors cannot; every
pickle-based file is read by an allow-list unpickler (``engine/safe_load.py``): torch's
``weights_only`` loader for ``.pt`` files, DeepSpeed's and DCP's shards. The manifest's SHA-256
sums catch corruption (bit rot, truncated copies, a half-written file), not malice: whoever can
write the directory can rewrite the manifest too. DeepSpeed's ``zero_to_fp32.py`` is never run.

Save: every rank writes into ``.tmp_step_<n>_<rand>/`` (same directory, so the final
``os.rename`` is atomic), barrier, every rank fsyncs and hashes its share of the files, rank 0
writes the manifest and COMPLETE and renames, barrier, rank 0 prunes. A failed save removes its
temp dir (a full disk needs the space back) and raises on every rank; a crash at any point leaves
the previous checkpoints untouched; ``latest()`` skips temp and incomplete directories.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from accelerate.utils import DistributedType

from dist_ssl.engine.checkpoint_checks import (
    FORMAT_VERSION, STEP_DIR, compat_problem, record_problem, shape_problem)
from dist_ssl.engine.checkpoint_io import (
    CheckpointError, DCPException, load_training_state, one_line, restoring, save_training_state, torch_save,
    write_error)
from dist_ssl.engine.checkpoint_manifest import describe_files, verify_files
from dist_ssl.engine.checkpoint_stateful import (
    TRAINER_STATE, local_file, read_rank_states, rng_file, shared_file, split_stateful)
from dist_ssl.engine.rng_state import load_rng_state, save_rng_state
from dist_ssl.engine.safe_load import deepspeed_globals, parse_problem, safe_torch_load
from dist_ssl.parallel.accelerator import describe
from dist_ssl.parallel.collectives import all_gather_object, broadcast_object
from dist_ssl.run_files import CHECKPOINTS_DIR

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE", "TRAINER_STATE", "CRASH_ENV"]

COMPLETE = "COMPLETE"
CRASH_ENV = "DIST_SSL_CKPT_CRASH_AFTER_MODEL"  # test hook: os._exit(1) after the model files are written
_STALE = re.compile(r"^\.(tmp|old)_step_\d+_[0-9a-f]+$")


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Writes ``step_%08d`` checkpoints atomically under ``output_dir/checkpoints`` and keeps the last k.

    ``keep_last=0`` keeps every checkpoint. All methods that take an accelerator are collective:
    every rank must call them.
    """

    def __init__(self, output_dir: Path, keep_last: int = 3):
        if keep_last < 0:
            raise ValueError(f"keep_last: must be >= 0 (0 = keep all), got {keep_last}")
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = STEP_DIR.match(p.name)
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
    def save(self, step: int, accelerator, state: Mapping[str, Any], *,
             stateful: Mapping[str, Any] | None = None) -> Path:
        """Write ``step_<step>`` atomically (collective). ``state`` must be JSON-able.

        ``stateful``: name -> object with ``state_dict()`` / ``load_state_dict()`` that the
        accelerator does not save (as torchtitan's CheckpointManager takes them); see
        ``engine/checkpoint_stateful.py`` for which rank writes what. A write error on any rank
        raises CheckpointError on every rank.
        """
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        per_rank, shared = split_stateful(stateful)
        meta = dict(describe(accelerator), format_version=FORMAT_VERSION, per_rank=sorted(per_rank),
                    shared=sorted(shared), accelerator_step=int(accelerator.step),
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        record = {"step": step, "meta": meta, "state": dict(state)}
        json.dumps(record)  # not JSON-able -> TypeError on every rank, before anything is written
        main, final = accelerator.is_main_process, self.path_for(step)
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / broadcast_object(f".tmp_{final.name}_{secrets.token_hex(4)}" if main else None)

        failure = self._write_all_ranks(tmp, accelerator, per_rank, shared)
        failures = [f for f in all_gather_object(failure) if f]  # doubles as the barrier before hashing
        if not failures:
            record["files"], failures = self._describe_all_ranks(tmp, accelerator)
        if not failures and main:
            try:
                self._finalize(tmp, final, record)
            except OSError as exc:
                failures = [f"{final}: cannot finish the checkpoint ({write_error(exc, self.root)})"]
        failures = broadcast_object(failures)  # doubles as the barrier after the rename
        if failures:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays; the space comes back
            raise CheckpointError(failures[0] + "; the previous checkpoint is intact")
        if main:
            self._prune()
        logger.info("checkpoint saved: %s", final)
        return final

    @staticmethod
    def _write_all_ranks(tmp: Path, accelerator, per_rank: Mapping[str, Any], shared: Mapping[str, Any]) -> str | None:
        """Every rank's share of the files; a one-line problem or None."""
        rank = accelerator.process_index
        try:
            tmp.mkdir(parents=True, exist_ok=True)  # every rank: no barrier needed before writing
            save_training_state(accelerator, tmp)  # collective for FSDP2 / DeepSpeed
            if os.environ.get(CRASH_ENV) == "1":
                logger.error("%s=1: simulating a crash in the middle of a checkpoint save", CRASH_ENV)
                os._exit(1)
            save_rng_state(tmp / rng_file(rank))
            if accelerator.is_main_process:
                for name, obj in shared.items():
                    torch_save(obj.state_dict(), tmp / shared_file(name))
            for name, obj in per_rank.items():
                torch_save(obj.state_dict(), tmp / local_file(name, rank))
        except (Exception, DCPException) as exc:  # noqa: BLE001 - reported on every rank by the caller
            return f"{tmp}: rank {rank} could not write its files ({write_error(exc, tmp.parent)})"
        return None

    @staticmethod
    def _describe_all_ranks(tmp: Path, accelerator) -> tuple[dict, list[str]]:
        """fsync + size + hash of every file, each rank taking every R-th one (collective)."""
        rank, world = accelerator.process_index, accelerator.num_processes
        rels = broadcast_object(sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                                if accelerator.is_main_process else None)
        try:
            part, problem = describe_files(tmp, rels[rank::world]), None
        except Exception as exc:  # noqa: BLE001
            part, problem = {}, f"{tmp}: rank {rank} could not hash its share ({write_error(exc, tmp.parent)})"
        files, failures = {}, []
        for p, f in all_gather_object((part, problem)):
            files.update(p)
            failures += [f] if f else []
        return files, failures

    def _finalize(self, tmp: Path, final: Path, record: dict) -> None:
        """Rank 0, after every rank wrote and hashed: manifest, COMPLETE last, atomic rename."""
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
            if _STALE.match(p.name) or (STEP_DIR.match(p.name) and p.is_dir() and not (p / COMPLETE).exists()):
                doomed.append(p)
        for p in doomed:
            (p / COMPLETE).unlink(missing_ok=True)  # first, so a half-deleted dir is never "complete"
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    @staticmethod
    def peek(path: Path) -> dict:
        """``{"step": ..., **state}`` from the trainer state of checkpoint ``path`` alone, nothing
        verified or restored: what a run checks against its own settings before ``load``; {} when
        unreadable (``load`` then says why)."""
        try:
            record = json.loads((Path(path) / TRAINER_STATE).read_text(encoding="utf-8"))
            return {**record["state"], "step": record["step"]}
        except Exception:  # noqa: BLE001 - load's checks name the problem
            return {}

    def load(self, path: Path, accelerator, *, stateful: Mapping[str, Any] | None = None) -> dict:
        """Restore everything ``save`` wrote (collective); returns ``{"step": ..., **state}``.
        A per-rank object saved by another number of processes is re-sharded when it has
        ``load_all_ranks(states)`` (every saved rank's state), else refused.

        Raises CheckpointError on every rank, naming the file, when the checkpoint is incomplete,
        corrupt (size / hash), unsafe (a pickled object outside the allow-list) or incompatible
        (other backend, shapes). Every file is verified against the manifest before any is read.
        """
        path = Path(path)
        per_rank, shared = split_stateful(stateful)
        try:
            problem = self._precheck(path, accelerator, per_rank, shared)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the all_gather below
            problem = f"{path}: cannot be checked ({type(exc).__name__}: {one_line(exc, 160)})"
        problems = [p for p in all_gather_object(problem) if p]  # same verdict on every rank: no hang
        if problems:
            raise CheckpointError(problems[0])
        record = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        load_training_state(accelerator, path)  # collective; CheckpointError naming the file
        for name, obj in shared.items():
            with restoring(path / shared_file(name), repr(name)):
                obj.load_state_dict(safe_torch_load(path / shared_file(name)))
        self._load_per_rank(path, accelerator, record, per_rank)
        accelerator.step = int(record["meta"].get("accelerator_step", 0))  # its gradient-accumulation phase
        self._load_rng(path, accelerator, record)
        logger.info("checkpoint loaded: %s (step %d)", path, record["step"])
        return {**record["state"], "step": record["step"]}

    @staticmethod
    def _load_per_rank(path: Path, accelerator, record: dict, per_rank: Mapping[str, Any]) -> None:
        rank, saved_world = accelerator.process_index, record["meta"]["num_processes"]
        for name, obj in per_rank.items():
            if saved_world != accelerator.num_processes:  # re-shard from every saved rank's file
                with restoring(path, f"{name!r} re-sharded from {saved_world} to {accelerator.num_processes} processes"):
                    obj.load_all_ranks(read_rank_states(path, name))
                continue
            f = path / local_file(name, rank)
            with restoring(f, repr(name)):
                obj.load_state_dict(safe_torch_load(f))

    @staticmethod
    def _load_rng(path: Path, accelerator, record: dict) -> None:
        rank, same_world = accelerator.process_index, record["meta"]["num_processes"] == accelerator.num_processes
        f = path / rng_file(rank)
        if not same_world and not f.is_file():
            logger.warning("%s: not in the checkpoint (written by %d processes, this run has %d): this rank's "
                           "random streams start fresh, so the resume is not exact", f,
                           record["meta"]["num_processes"], accelerator.num_processes)
            return
        with restoring(f, "the random number generators"):
            missing = load_rng_state(f)
        if missing:
            logger.warning("%s: no saved state for %s on this machine: the resume is not exact", f, ", ".join(missing))

    def _precheck(self, path: Path, accelerator, per_rank: Mapping[str, Any], shared: Mapping[str, Any]) -> str | None:
        """This rank's share of the checks (manifest, sizes, hashes, shapes); a one-line problem or None."""
        if not path.is_dir():
            return f"{path}: checkpoint directory does not exist"
        if not (path / COMPLETE).is_file():
            return f"{path / COMPLETE}: missing, the checkpoint is incomplete (crashed save?)"
        state_file = path / TRAINER_STATE
        try:
            record = json.loads(state_file.read_text(encoding="utf-8"))
            meta, step, files = record["meta"], record["step"], record["files"]
            _ = record["state"], meta["num_processes"], meta["backend"]
        except Exception as exc:  # noqa: BLE001
            return f"{state_file}: unreadable ({type(exc).__name__}: {one_line(exc, 160)})"
        problem = (record_problem(state_file, path.name, meta, step, files)
                   or compat_problem(state_file, meta, accelerator, per_rank, shared))
        if problem:
            return problem
        rank, world, saved_world = accelerator.process_index, accelerator.num_processes, meta["num_processes"]
        needed = [shared_file(n) for n in shared] + ([rng_file(rank)] if saved_world == world else [])
        for name, obj in per_rank.items():
            if saved_world != world and not hasattr(obj, "load_all_ranks"):
                return (f"{path}: {name!r} was saved by {saved_world} processes and cannot be re-sharded "
                        f"for {world}; resume with {saved_world} processes")
            needed += [local_file(name, r) for r in (range(saved_world) if saved_world != world else [rank])]
        for rel in needed:
            if rel not in files:
                return f"{path / rel}: missing (not in the manifest of {state_file.name})"
        share = sorted(files)[rank::world]  # spread over the ranks
        problem = verify_files(path, files, share)
        if problem:
            return problem
        allowed = deepspeed_globals() if accelerator.distributed_type == DistributedType.DEEPSPEED else ()
        for rel in share:
            if problem := parse_problem(path / rel, allowed):
                return f"{path / rel}: {problem}"
        return shape_problem(path, accelerator)
