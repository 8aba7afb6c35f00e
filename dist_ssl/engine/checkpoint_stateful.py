"""The objects a checkpoint holds besides the accelerator's (``CheckpointManager(stateful=...)``),
their files, and the one reader of per-rank state.

An object's ``per_rank`` attribute (default False) says how it is saved: False, it is the same on
every rank (method buffers, EMA) and rank 0 writes ``shared_<name>.pt``; True, it differs per rank
(model-parallel state the accelerator does not know: ``parallel/rank_local.py``) and every rank
writes ``<name>_<rank>.pt``. State dicts hold tensors, containers, numbers and strings only:
they are read back with ``weights_only=True``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from dist_ssl.engine.checkpoint_io import CheckpointError, restoring
from dist_ssl.engine.safe_load import safe_torch_load

__all__ = ["TRAINER_STATE", "rng_file", "local_file", "shared_file", "split_stateful", "read_rank_states"]

TRAINER_STATE = "trainer_state.json"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def local_file(name: str, rank: int) -> str:
    return f"{name}_{rank:05d}.pt"


def shared_file(name: str) -> str:
    return f"shared_{name}.pt"


def split_stateful(stateful: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """(per-rank, shared) objects: an object's ``per_rank`` attribute says which (default shared)."""
    stateful = dict(stateful or {})
    per_rank = {n: o for n, o in stateful.items() if getattr(o, "per_rank", False)}
    return per_rank, {n: o for n, o in stateful.items() if n not in per_rank}


def read_rank_states(path: Path, name: str) -> list[dict]:
    """Every saved rank's state of the per-rank object ``name`` of checkpoint ``path``, in rank
    order, memory-mapped (a re-sharding rank reads only the rows it takes). The one reader of
    rank-local state: a resume on another world size and tools/export_fc.py. CheckpointError
    naming the file when one is missing or unreadable."""
    state_file = Path(path) / TRAINER_STATE
    with restoring(state_file, "the trainer state"):
        meta = json.loads(state_file.read_text(encoding="utf-8"))["meta"]
    if name not in meta.get("per_rank", []):
        raise CheckpointError(f"{state_file}: no per-rank object {name!r} (saved: {meta.get('per_rank', [])})")
    states = []
    for rank in range(int(meta["num_processes"])):
        f = Path(path) / local_file(name, rank)
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint was written by {meta['num_processes']} processes)")
        with restoring(f, repr(name)):
            states.append(safe_torch_load(f, mmap=True))
    return states
