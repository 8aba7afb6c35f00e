"""`dist-ssl-export-fc` (also ``tools/export_fc.py``): export the full sharded N-way classifier
W [N, D] of a checkpoint to one safetensors file.

    dist-ssl-export-fc RUN_DIR/checkpoints/step_00001234 OUT.safetensors [--key classifier]

Reads every rank's ``rank_local_local_modules_<rank>.pt`` (``torch.load(weights_only=True)``),
takes from each the ShardedLinear state (``{"weight", "shard_start", "num_classes",
"world_size", ...}``) under ``--key`` (default: ``classifier`` as IDMM saves it, else the first
entry holding a ``shard_start``), checks that the shards tile [0, N) exactly and that no rank is
missing, and writes ``weight`` [N, D] (and ``bias`` [N] if present) atomically (temp file +
fsync + rename). Memory: one full copy of W (ImageNet, D=192: ~1 GB fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dist_ssl.atomic import atomic_save_safetensors
from dist_ssl.parallel.sharded_fc import reshard_rows

FILE_GLOB = "rank_local_local_modules_*.pt"
DEFAULT_KEY = "classifier"


def find_shard_state(state: dict, key: str | None, where: Path) -> dict:
    """The ShardedLinear state inside one rank's local-modules state."""
    if key:
        if key not in state:
            raise SystemExit(f"{where}: no key {key!r} (keys: {sorted(state)})")
        return state[key]
    if "shard_start" in state:
        return state
    if isinstance(state.get(DEFAULT_KEY), dict) and "shard_start" in state[DEFAULT_KEY]:
        return state[DEFAULT_KEY]
    for value in state.values():
        if isinstance(value, dict) and "shard_start" in value:
            return value
    raise SystemExit(f"{where}: no sharded classifier state (an entry with 'shard_start'); keys: {sorted(state)}")


def load_shards(ckpt: Path, key: str | None) -> list[dict]:
    files = sorted(ckpt.glob(FILE_GLOB))
    if not files:
        raise SystemExit(f"{ckpt}: no {FILE_GLOB} files (not a checkpoint of a sharded-classifier method?)")
    shards = [find_shard_state(torch.load(f, map_location="cpu", weights_only=True), key, f) for f in files]
    worlds = {int(s["world_size"]) for s in shards}
    if len(worlds) != 1 or worlds.pop() != len(files):
        raise SystemExit(f"{ckpt}: {len(files)} rank files but the shards say world size "
                         f"{sorted({int(s['world_size']) for s in shards})}: a rank file is missing or stray")
    if len({int(s["num_classes"]) for s in shards}) != 1:
        raise SystemExit(f"{ckpt}: shards disagree on num_classes")
    return shards


def assemble(shards: list[dict]) -> dict[str, torch.Tensor]:
    """{"weight": [N, D], ("bias": [N])} from the row shards (raises on gaps / overlaps)."""
    n = int(shards[0]["num_classes"])
    starts = [int(s["shard_start"]) for s in shards]
    out = {"weight": reshard_rows([s["weight"] for s in shards], starts, 0, n)}
    if all("bias" in s for s in shards):
        out["bias"] = reshard_rows([s["bias"] for s in shards], starts, 0, n)
    return {k: v.contiguous() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="export_fc.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX checkpoint directory")
    ap.add_argument("out", type=Path, help="output .safetensors file")
    ap.add_argument("--key", default=None,
                    help=f"entry of the local-modules state holding the shard (default: {DEFAULT_KEY!r}, "
                         "else the first with 'shard_start')")
    args = ap.parse_args(argv)
    shards = load_shards(args.checkpoint, args.key)
    tensors = assemble(shards)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(args.out, tensors, {"num_classes": str(shards[0]["num_classes"]),
                                                "saved_world_size": str(len(shards)),
                                                "checkpoint": str(args.checkpoint.resolve())})
    w = tensors["weight"]
    print(f"wrote {args.out}: weight {tuple(w.shape)} {w.dtype}" + (" + bias" if "bias" in tensors else "")
          + f" from {len(shards)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
