"""`dist-ssl-shards` (also ``tools/make_shards.py``): write or verify WebDataset shards.

    make_shards write SOURCE OUT_DIR [--split train|test] [--samples-per-shard 1000]
                [--subset per-class:K | random:N] [--seed 0] [--workers W] [--overwrite] [--strict]
                [--resize SHORT_SIDE [--quality 90]]
    make_shards verify OUT_DIR [--workers W]

Exit status: 0 ok; 1 ``verify`` found a problem; 2 bad arguments or input, or an OS error such
as a full disk (one line on stderr: ``make_shards: error: ...``, no traceback).
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
import time

from dist_ssl.data.errors import ShardError
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.shard_writer import write_dataset_report
from dist_ssl.errors import UserError, exit_with_message, run_command

PROG = "make_shards"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write or verify WebDataset shards.")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="shard SOURCE into OUT_DIR (resumable)")
    w.add_argument("source", metavar="SOURCE",
                   help="imagefolder:DIR | idx:DIR | list:FILE.csv (columns path,label)")
    w.add_argument("out_dir", metavar="OUT_DIR")
    w.add_argument("--split", choices=("train", "test"), default="train",
                   help="IDX files to read (test = t10k-*); recorded for other sources")
    w.add_argument("--samples-per-shard", type=int, default=1000)
    w.add_argument("--subset", default=None, help="per-class:K or random:N (seeded)")
    w.add_argument("--seed", type=int, default=0, help="seeds the subset and the sample order")
    w.add_argument("--workers", type=int, default=1, help="processes to decode/write with")
    w.add_argument("--overwrite", action="store_true",
                   help="replace a dataset in OUT_DIR made with other arguments")
    w.add_argument("--strict", action="store_true", help="a bad input file is an error")
    w.add_argument("--resize", type=int, default=None, metavar="SHORT_SIDE",
                   help="store images whose shorter side is larger as JPEGs with this shorter "
                        "side (aspect kept, never upsampled); default: copy the files' bytes")
    w.add_argument("--quality", type=int, default=None,
                   help="JPEG quality of --resize (default 90)")
    v = sub.add_parser("verify", help="check every shard against manifest.json")
    v.add_argument("out_dir", metavar="OUT_DIR")
    v.add_argument("--workers", type=int, default=1)
    return p


def _write(a) -> int:
    t0 = time.perf_counter()
    m, written = write_dataset_report(
        a.source, a.out_dir, split=a.split, samples_per_shard=a.samples_per_shard,
        subset=a.subset, seed=a.seed, workers=a.workers, overwrite=a.overwrite, strict=a.strict,
        resize=a.resize, quality=a.quality)
    dt = time.perf_counter() - t0
    done = (f"wrote {written} of {len(m.shards)} shards in {dt:.1f} s" if written
            else "already complete, nothing written")
    rate = f", {m.num_samples / dt:.0f} images/s" if written == len(m.shards) else ""
    print(f"{PROG}: {a.out_dir}: {m.num_samples} samples, {m.num_classes} classes, "
          f"{len(m.skipped)} skipped; {done}{rate}")
    return 0


def _verify(a) -> int:
    t0 = time.perf_counter()
    m = verify_dataset(a.out_dir, workers=a.workers)
    print(f"{PROG}: OK {a.out_dir}: {len(m.shards)} shards, {m.num_samples} samples "
          f"(ids 0..{m.num_samples - 1}), {m.num_classes} classes, all images decode "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _run(a) -> int:
    try:
        return _write(a) if a.command == "write" else _verify(a)
    except ShardError as e:  # verify found a problem
        return exit_with_message(PROG, e, 1)
    except OSError as e:  # disk full, permissions, read-only file system... one line, no traceback
        raise UserError(_os_error(e, a.out_dir)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, _run, args, level=logging.WARNING if args.quiet else logging.INFO,
                       errors=(UserError,))


def _os_error(e: OSError, out_dir: str) -> str:
    """'No space left on device (ENOSPC): FILE: what to do' from an OSError."""
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = (e.strerror or str(e)) + (f" ({code})" if code else "")
    if e.filename:
        text += f": {e.filename}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += (f"; free space in OUT_DIR {out_dir} or choose another, then rerun the same "
                 f"command (finished shards are kept)")
    return text


if __name__ == "__main__":
    sys.exit(main())
