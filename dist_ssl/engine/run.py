"""`tools/train.py RECIPE.yaml [dotted.key=value ...]`: the one training entry point.

Exit codes: 0 done; 2 bad config / data / checkpoint (one line on stderr, no traceback);
75 preempted and checkpointed (requeue me; see preemption.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

EXIT_BAD_INPUT = 2


def _setup_logging() -> None:
    # rank from the launcher's env: INFO on rank 0, WARNING elsewhere
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a dist_ssl recipe (single process, or under "
        "`accelerate launch` / torchrun / srun for DDP, FSDP2, DeepSpeed ZeRO).")
    parser.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    from dist_ssl.config import ConfigError, config_to_yaml, load_config
    from dist_ssl.data.errors import DataError
    from dist_ssl.data.manifest import ManifestError
    from dist_ssl.engine.checkpoint import CheckpointError

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        from dist_ssl.engine.trainer import Trainer

        return Trainer(cfg).fit()
    except (ConfigError, DataError, ManifestError, CheckpointError, FileNotFoundError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
