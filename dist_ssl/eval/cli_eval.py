"""`dist-ssl-eval` (also ``tools/eval.py``): k-NN and linear-probe accuracy of a frozen backbone.

    dist-ssl-eval (--backbone RUN_DIR|FILE.safetensors | --random ARCH --in-chans C --img-size S --out F)
        --train SHARDS --test SHARDS
        [--img-size S] [--methods knn,linear] [--knn-k 20] [--knn-t 0.07]
        [--linear-epochs 100] [--linear-wd 1e-4[,1e-3,...]] [--batch-size 256] [--workers 2]
        [--out FILE.json] [--save-features FILE.safetensors] [--device cpu|cuda]

Prints one ``eval: <metric> <value>`` line per metric and writes them (with what produced
them) atomically to ``--out``; the default is ``eval_probe.json`` in the run dir, or next to
the export file. Under torchrun (WORLD_SIZE > 1) feature extraction is split over ranks
(NCCL on GPUs, else gloo); rank 0 then computes the metrics alone and writes the files.
Exit status: 0 ok; 2 bad arguments or input (one line on stderr, ``eval: error: ...``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ssl.atomic import atomic_write_json
from dist_ssl.data.loader import build_eval_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.errors import first_line, run_command
from dist_ssl.eval.features import (EvalError, extract_features, load_frozen_backbone, resolve_backbone_path,
                                    save_features)
from dist_ssl.eval.knn import knn_accuracy
from dist_ssl.eval.linear_probe import LinearProbeConfig, linear_probe
from dist_ssl.models import ModelConfig, create_backbone
from dist_ssl.parallel.collectives import get_rank, get_world_size, is_dist
from dist_ssl.run_files import PROBE_FILE

PROG = "eval"
METHODS = ("knn", "linear")
log = logging.getLogger(PROG)


def _csv(kind, choices=None):
    def parse(text: str):
        try:
            items = [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}")
        bad = [i for i in items if choices is not None and i not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices or ())}, got {text!r}")
        return tuple(items)
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="k-NN / linear-probe accuracy of a "
                                "frozen backbone on shard dirs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", help="run dir (with backbone.safetensors) or export file")
    src.add_argument("--random", metavar="ARCH", help="a randomly initialised backbone instead (the random-init "
                     "reference row of a table; seeded by --seed; needs --img-size and --out)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels of --random")
    p.add_argument("--train", required=True, help="train shard dir (tools/make_shards.py)")
    p.add_argument("--test", required=True, help="test shard dir")
    p.add_argument("--img-size", type=int, default=None, help="eval resolution; default: the export's")
    p.add_argument("--methods", type=_csv(str, METHODS), default=METHODS, help="knn,linear")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of exp(sim / T)")
    p.add_argument("--knn-chunk", type=int, default=256, help="test rows per similarity block")
    p.add_argument("--linear-epochs", type=int, default=100, help="full-batch L-BFGS iterations")
    p.add_argument("--linear-wd", type=_csv(float), default=(1e-4,),
                   help="L2 weight decay; a comma list picks one on 10%% of train")
    p.add_argument("--seed", type=int, default=0, help="seeds the weight-decay split")
    p.add_argument("--batch-size", type=int, default=256, help="images per extraction batch (per rank)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help=f"metrics JSON; default: {PROBE_FILE} by the backbone")
    p.add_argument("--save-features", default=None, metavar="FILE",
                   help="also write train/test features, labels, ids as safetensors")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def _check_inputs(a) -> tuple[Path, Path, dict]:
    """Backbone file, output path, manifests: fail fast with one line, before any process group."""
    if a.img_size is not None and a.img_size < 1:
        raise EvalError(f"--img-size must be >= 1, got {a.img_size}")
    if min(a.knn_k, a.knn_chunk, a.linear_epochs, a.batch_size) < 1 or a.knn_t <= 0 or a.workers < 0:
        raise EvalError("need --knn-k, --knn-chunk, --linear-epochs, --batch-size >= 1, "
                        "--knn-t > 0, --workers >= 0")
    _check_device(a.device)
    if any(wd < 0 for wd in a.linear_wd):
        raise EvalError(f"--linear-wd must be >= 0, got {a.linear_wd}")
    if a.random and (a.img_size is None or a.out is None or a.in_chans not in (1, 3)):
        raise EvalError("--random needs --img-size, --out and --in-chans 1 or 3")
    backbone = None if a.random else resolve_backbone_path(a.backbone)
    out = Path(a.out) if a.out else backbone.parent / PROBE_FILE
    for path in (out, Path(a.save_features or out)):
        if not path.parent.is_dir():
            raise EvalError(f"{path.parent}: output directory does not exist")
    manifests = {"train": load_manifest(a.train), "test": load_manifest(a.test)}
    if manifests["train"].classes != manifests["test"].classes:
        raise EvalError(f"{a.train} and {a.test} have different classes "
                        f"({manifests['train'].num_classes} vs {manifests['test'].num_classes})")
    return backbone, out, manifests


def random_backbone(a) -> tuple[torch.nn.Module, dict]:
    """A headless ``a.random`` backbone with seeded random weights, in eval mode, and its info."""
    torch.manual_seed(a.seed)
    try:
        model = create_backbone(ModelConfig(name=a.random, img_size=a.img_size, in_chans=a.in_chans))
    except (ValueError, RuntimeError) as e:
        raise EvalError(f"--random {a.random}: {first_line(e)}") from None
    info = {"architecture": a.random, "in_chans": a.in_chans, "img_size": a.img_size,
            "num_features": int(model.num_features)}
    return model.eval().requires_grad_(False), info


def _check_device(name: str | None) -> None:
    """--device must name this machine's CPU or one of its CUDA devices."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {name!r}: not a device this tool runs on (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _setup_distributed(device_arg: str | None) -> tuple[torch.device, bool]:
    """Join torchrun's process group when WORLD_SIZE > 1 and none exists yet.

    Returns (the device this rank computes on, whether this call created the group).
    """
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    device = torch.device(device_arg or "cpu")
    if cuda and device_arg in (None, "cuda"):  # one GPU per rank, as torchrun numbers them
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, True
    return device, False


def _features(a, model, info, device, split: str):
    t0 = time.perf_counter()
    loader = build_eval_loader(getattr(a, split), info["img_size"], a.batch_size,
                               rank=get_rank(), world_size=get_world_size(),
                               num_workers=a.workers, in_chans=info["in_chans"])
    out = extract_features(model, loader, device)
    log.info("%s: %d features of dim %d in %.1f s", split, len(out[0]), out[0].shape[1],
             time.perf_counter() - t0)
    return out


def _metrics(a, tr, te, num_classes: int, device) -> dict:
    res: dict = {}
    if "knn" in a.methods:
        knn = knn_accuracy(tr[0].to(device), tr[1], te[0].to(device), te[1], num_classes,
                           k=a.knn_k, temperature=a.knn_t, chunk_size=a.knn_chunk)
        res.update(knn_top1=knn["top1"], knn_top5=knn["top5"],
                   knn={"k": a.knn_k, "temperature": a.knn_t})
    if "linear" in a.methods:
        cfg = LinearProbeConfig(epochs=a.linear_epochs, weight_decays=a.linear_wd, seed=a.seed)
        lin = linear_probe(tr[0], tr[1], te[0], te[1], num_classes, cfg, device)
        res.update(linear_top1=lin.pop("top1"), linear_top5=lin.pop("top5"),
                   linear={"epochs": cfg.epochs, "seed": cfg.seed, **lin})
    return res


def _run(a) -> int:
    backbone, out, manifests = _check_inputs(a)
    model, info = random_backbone(a) if a.random else load_frozen_backbone(backbone, a.img_size)
    device, own_group = _setup_distributed(a.device)
    rank, world = get_rank(), get_world_size()
    model.to(device)
    t0 = time.perf_counter()
    tr = _features(a, model, info, device, "train")
    te = _features(a, model, info, device, "test")
    t_extract = time.perf_counter() - t0
    if own_group:  # the gathers were the last collectives: rank 0 goes on alone
        dist.destroy_process_group()
    if rank != 0:
        return 0
    if a.save_features:
        save_features(a.save_features, {"train_feats": tr[0], "train_labels": tr[1],
                                        "train_index": tr[2], "test_feats": te[0],
                                        "test_labels": te[1], "test_index": te[2]})
    t1 = time.perf_counter()
    res = _metrics(a, tr, te, manifests["train"].num_classes, device)
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        if key in res:
            print(f"{PROG}: {key} {res[key]:.4f}")
    res.update(backbone=str(backbone) if backbone else f"random:{a.random}", **info, train=str(a.train), test=str(a.test),
               num_train=len(tr[0]), num_test=len(te[0]),
               num_classes=manifests["train"].num_classes, world_size=world,
               seconds={"extract": round(t_extract, 2), "metrics": round(time.perf_counter() - t1, 2)})
    atomic_write_json(out, res)
    print(f"{PROG}: wrote {out}")
    return 0


def _env_rank() -> int:
    """torchrun's RANK before any process group exists (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank0 = _env_rank() == 0
    return run_command(PROG, _run, args, level=logging.INFO if rank0 and not args.quiet else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
