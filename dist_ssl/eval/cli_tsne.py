"""`dist-ssl-tsne` (also ``tools/tsne.py``): t-SNE PNG of a frozen backbone's features on a shard
set, the IDMM paper's Figure 2 (the steps are in tsne.py).

    dist-ssl-tsne --backbone RUN_DIR|FILE.safetensors --shards SHARDS --out tsne.png
        [--classes 10] [--per-class 100] [--perplexity 30] [--seed 0] [--img-size S]
    dist-ssl-tsne --random vit_pico_patch4_28 --img-size 28 --in-chans 1 --shards ... --out ...

Exit status: 0 ok; 2 bad arguments or input (one line on stderr, ``tsne: error: ...``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_ssl.data.loader import build_eval_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.errors import run_command
from dist_ssl.eval.features import EvalError, extract_features, load_frozen_backbone, resolve_backbone_path
from dist_ssl.eval.tsne import choose_points, embed_2d, plot_embedding
from dist_ssl.models import ModelConfig, create_backbone

PROG = "tsne"
log = logging.getLogger(PROG)


def _backbone(a) -> tuple[nn.Module, int, int, str]:
    """(model, img_size, in_chans, description) from --backbone or --random."""
    if a.random:
        torch.manual_seed(a.seed)
        try:
            model = create_backbone(ModelConfig(name=a.random, img_size=a.img_size, in_chans=a.in_chans))
        except ValueError as e:
            raise EvalError(f"--random: {e}") from None
        size = a.img_size or int(getattr(getattr(model, "patch_embed", None), "img_size", (224,))[0])
        return model.eval().requires_grad_(False), size, a.in_chans, f"random init. {a.random}"
    path = resolve_backbone_path(a.backbone)
    model, info = load_frozen_backbone(path, a.img_size)
    return model, info["img_size"], info["in_chans"], f"{info['architecture']} ({path.parent.name})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="t-SNE of a frozen backbone's features on a "
                                "shard set, as a PNG coloured by class (IDMM paper Figure 2).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", help="run dir (with backbone.safetensors) or export file")
    src.add_argument("--random", metavar="ARCH", help="a randomly initialised backbone instead")
    p.add_argument("--shards", required=True, help="shard dir (tools/make_shards.py)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--classes", type=int, default=10, help="classes drawn at random (Figure 2: 10)")
    p.add_argument("--class-ids", default=None, help="comma list of class ids instead of --classes")
    p.add_argument("--per-class", type=int, default=100, help="points per class at most")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of points, t-SNE, --random's init")
    p.add_argument("--img-size", type=int, default=None, help="eval resolution; default: the export's")
    p.add_argument("--in-chans", type=int, default=3, help="--random only: input channels")
    p.add_argument("--title", default=None, help="plot title; default: backbone and shard set")
    p.add_argument("--size", type=int, default=800, help="PNG side in pixels")
    p.add_argument("--batch-size", type=int, default=256, help="images per extraction batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def _check(a) -> tuple[Path, list[int] | None]:
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise EvalError(f"--out {out}: expected a .png file")
    if not out.parent.is_dir():
        raise EvalError(f"{out.parent}: output directory does not exist")
    if min(a.classes, a.per_class, a.batch_size, a.size) < 1 or a.perplexity <= 0 or a.workers < 0:
        raise EvalError("need --classes, --per-class, --batch-size, --size >= 1, --perplexity > 0, --workers >= 0")
    if a.img_size is not None and a.img_size < 1:
        raise EvalError(f"--img-size must be >= 1, got {a.img_size}")
    try:
        ids = [int(t) for t in a.class_ids.split(",") if t.strip()] if a.class_ids else None
    except ValueError:
        raise EvalError(f"--class-ids: expected a comma list of ints, got {a.class_ids!r}") from None
    return out, ids


def _run(a) -> int:
    out, ids = _check(a)
    manifest = load_manifest(a.shards)
    model, size, in_chans, desc = _backbone(a)
    t0 = time.perf_counter()
    loader = build_eval_loader(a.shards, size, a.batch_size, num_workers=a.workers, in_chans=in_chans)
    feats, labels, _ = extract_features(model, loader, torch.device("cpu"))
    rows = choose_points(labels.numpy(), a.classes, a.per_class, a.seed, ids)
    log.info("%d features of dim %d in %.1f s; t-SNE of %d points of %d classes", len(feats), feats.shape[1],
             time.perf_counter() - t0, len(rows), len(np.unique(labels.numpy()[rows])))
    xy = embed_2d(feats.numpy()[rows], a.perplexity, a.seed)
    title = a.title if a.title is not None else f"{desc} on {Path(a.shards).name}"
    plot_embedding(xy, labels.numpy()[rows], out, class_names=manifest.classes, title=title, size_px=a.size)
    print(f"{PROG}: wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, _run, args, level=logging.WARNING if args.quiet else logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
