"""`dist-ssl-export-fc` (also ``tools/export_fc.py``): export the full sharded N-way classifier
W [N, D] of a checkpoint to one safetensors file.

    dist-ssl-export-fc RUN_DIR/checkpoints/step_00001234 OUT.safetensors [--key classifier]

In engine/ (not parallel/) because it reads checkpoints through the engine's reader.

Reads every rank's rank-local state (``rank_local_<rank>.pt``, see dist_ssl/parallel/rank_local.py)
with the reader a resume on another world size uses (``read_rank_states``: the allow-list loader,
every rank's file present), assembles the shard named ``--key`` (default: the only one, else
``classifier`` as IDMM names it) exactly as a one-process resume would (the shards must tile [0, N)),
and writes ``weight`` [N, D] (and ``bias`` [N] if present) atomically (temp file + fsync +
rename). Memory: one full copy of W (ImageNet, D=192: ~1 GB fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_ssl.atomic import atomic_save_safetensors
from dist_ssl.engine.checkpoint_io import CheckpointError
from dist_ssl.engine.checkpoint_stateful import read_rank_states
from dist_ssl.parallel.rank_local import STATE_NAME, full_shards

DEFAULT_KEY = "classifier"


def pick(names: list[str], key: str | None, where: Path) -> str:
    """The rank-local module to export: ``key``, else the only one, else DEFAULT_KEY."""
    if key is None and len(names) == 1:
        return names[0]
    key = key or DEFAULT_KEY
    if key not in names:
        raise SystemExit(f"{where}: no rank-local module {key!r} (saved: {names}); choose one with --key")
    return key


def load_full(ckpt: Path, key: str | None) -> tuple[dict, int]:
    """(the assembled state {"weight", ("bias",) "num_classes", ...}, the saved world size)."""
    try:
        states = read_rank_states(ckpt, STATE_NAME)
        return full_shards(states)[pick(sorted(states[0]["modules"]), key, ckpt)], len(states)
    except CheckpointError as exc:  # names the file
        raise SystemExit(str(exc)) from exc
    except ValueError as exc:  # shards that do not tile [0, N)
        raise SystemExit(f"{ckpt}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX checkpoint directory")
    ap.add_argument("out", type=Path, help="output .safetensors file")
    ap.add_argument("--key", default=None,
                    help=f"the rank-local module to export (default: the only one, else {DEFAULT_KEY!r})")
    args = ap.parse_args(argv)
    full, world = load_full(args.checkpoint, args.key)
    tensors = {k: full[k].contiguous() for k in ("weight", "bias") if k in full}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(args.out, tensors, {"num_classes": str(full["num_classes"]),
                                                "saved_world_size": str(world),
                                                "checkpoint": str(args.checkpoint.resolve())})
    w = tensors["weight"]
    print(f"wrote {args.out}: weight {tuple(w.shape)} {w.dtype}" + (" + bias" if "bias" in tensors else "")
          + f" from {world} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
