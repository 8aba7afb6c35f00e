"""`dist-ssl-train RECIPE.yaml [dotted.key=value ...]`: the one training entry point.

Also ``python -m dist_ssl.engine.cli_train``, ``accelerate launch -m dist_ssl.engine.cli_train``
and ``tools/train.py``. Exit codes: 0 done; 2 bad config / data / checkpoint, any
:class:`~dist_ssl.errors.UserError` (one line on stderr, no traceback);
75 preempted and checkpointed (requeue me; see preemption.py); 1 anything else.

Failures in multi-process runs: the rank that raises prints its error (a traceback, or the one
line of a bad input) and leaves at once with ``os._exit``, running no collective, no
process-group teardown and no exit handler, any of which could wait for ranks that are busy
elsewhere (until the 30 min process-group timeout). Its sockets close with it, so the other
ranks' pending collectives fail within moments; they say so in one line (the first error is
the one above) and leave the same way, and the launcher (torchrun, srun) ends the job.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional

from dist_ssl.errors import EXIT_USER_ERROR, UserError, exit_with_message

PROG = "train.py"  # the name tests and users have seen in its error lines
EXIT_FAILED = 1
# Libraries whose INFO lines (per checkpoint, per launch) drown ours; WARNING unless -v / metrics.verbose.
THIRD_PARTY_LOGGERS = ("accelerate", "DeepSpeed", "deepspeed", "torch.distributed", "torch.nn.parallel",
                       "torch._dynamo", "torch._inductor", "timm", "PIL", "urllib3", "filelock")
# DeepSpeed warns on every import of a CPU-only process that it found no GPU; on the CPU code
# path that is the configuration asked for, not news.
_EXPECTED_NOISE = ("Setting accelerator to CPU",)

log = logging.getLogger("dist_ssl.engine.cli_train")  # not __name__: "__main__" under python -m


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


class _DropExpectedNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in record.getMessage() for s in _EXPECTED_NOISE)


def setup_logging(verbose: bool = False) -> None:
    """INFO on rank 0, WARNING elsewhere (rank from the launcher's env); third-party libraries
    at WARNING (their INFO too with ``verbose``)."""
    rank = _rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    set_library_verbosity(verbose)


def set_library_verbosity(verbose: bool) -> None:
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        for f in [f for f in logger.filters if isinstance(f, _DropExpectedNoise)]:
            logger.removeFilter(f)
        if not verbose:  # a logger's filters survive the library's own setup (DeepSpeed resets levels)
            logger.addFilter(_DropExpectedNoise())


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train a dist_ssl recipe (single process, or under "
        "`accelerate launch` / torchrun / srun for DDP, FSDP2, DeepSpeed ZeRO).")
    parser.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the INFO logs of accelerate, DeepSpeed and torch.distributed too")
    return parser.parse_args(argv)


def _leave(code: int) -> int:
    """Return ``code``; in a multi-process run leave the process now instead (module docstring)."""
    if _world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank left (its error is the one to read)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or (
        isinstance(exc, RuntimeError) and any(s in text for s in (
            "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "NCCL")))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from dist_ssl.config import config_to_yaml, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:  # before the trainer's imports: a config is printed without torch
            print(config_to_yaml(cfg), end="")
            return 0
        if cfg.metrics.verbose:
            set_library_verbosity(True)
        from dist_ssl.engine.trainer import Trainer

        return Trainer(cfg).fit()  # its success paths end the process group themselves
    except (UserError, FileNotFoundError) as exc:
        return _leave(exit_with_message(PROG, exc, EXIT_USER_ERROR))
    except BaseException as exc:  # noqa: BLE001 - in multi-process runs: report once, leave at once
        if _world_size() == 1 or isinstance(exc, SystemExit):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's teardown must not cut the report
        if _is_peer_failure(exc):
            log.error("rank %d: stopping: a collective with the other ranks failed, most likely because "
                      "another rank failed first (see its error): %s: %s", _rank(), type(exc).__name__,
                      str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "")
        else:
            log.error("rank %d failed; stopping every rank", _rank(), exc_info=exc)
        return _leave(EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
