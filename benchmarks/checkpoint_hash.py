"""What the SHA-256 manifest costs: hashing vs the whole save and load of a realistic checkpoint.

One process (world size 1, so one rank hashes everything; with R ranks each hashes ~1/R).
The model (default timm ViT-B/16, 86M parameters) takes one AdamW step so the optimizer holds
its two moments: the checkpoint is the model + optimizer + scheduler + RNG, ~1 GB in fp32.
Each round saves a checkpoint, loads it back, and separately hashes the saved files once
(``describe_files``, the same function save and load use), so the printed ratios are the share
of save and load time spent on hashing / verifying. Wall and CPU time are both printed: on a
shared machine wall time is an upper bound.

    python benchmarks/checkpoint_hash.py [--model vit_base_patch16_224] [--rounds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import timm
    from accelerate.state import AcceleratorState

    from dist_ssl.engine.checkpoint import CheckpointManager
    from dist_ssl.engine.checkpoint_manifest import describe_files
    from dist_ssl.parallel.accelerator import build_accelerator, prepare_model_and_optimizer
    from dist_ssl.parallel.config import ParallelConfig

    torch.set_num_threads(1)
    acc = build_accelerator(ParallelConfig())
    model = timm.create_model(args.model, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = prepare_model_and_optimizer(acc, model, opt, sched)
    acc.backward(model(torch.randn(1, 3, 224, 224)).sum())
    opt.step()  # the moments exist: the optimizer state is 2x the model
    rows = {"save": [], "load": [], "hash": []}
    with tempfile.TemporaryDirectory(prefix="ckpt_hash_", dir=".") as tmp:
        cm = CheckpointManager(Path(tmp), keep_last=1)
        for r in range(args.rounds):
            path, *t_save = timed(lambda: cm.save(r + 1, acc, {}))
            _, *t_load = timed(lambda: cm.load(path, acc))
            rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            files, *t_hash = timed(lambda: describe_files(path, rels, durable=False))
            for k, v in (("save", t_save), ("load", t_load), ("hash", t_hash)):
                rows[k].append(v)
        size = sum(f["size"] for f in files.values())
        shutil.rmtree(cm.root, ignore_errors=True)
    AcceleratorState._reset_state(True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    print(f"{args.model}: checkpoint {size / 1e9:.2f} GB in {len(files)} files, {args.rounds} rounds, medians")
    for k, (w, c) in med.items():
        print(f"  {k:5s} wall {w:6.2f} s   cpu {c:6.2f} s")
    print(f"  hashing: {size / 1e9 / med['hash'][1]:.2f} GB/s of CPU; "
          f"{med['hash'][0] / med['save'][0]:.2f} of the save wall time, {med['hash'][0] / med['load'][0]:.2f} of the load's")


if __name__ == "__main__":
    main()
