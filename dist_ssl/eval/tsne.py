"""t-SNE picture of a backbone's features on a shard set: the IDMM paper's Figure 2.

Cao, Yu & Wu (ECCV 2022), Figure 2: "t-SNE visualization of 10 classes selected from flowers using
DeiT-Tiny", one panel per pre-training method, before and after fine-tuning. Here one panel per
call: frozen pooled features of an export (or of a random initialisation, the "random init." panel)
on a shard set (``dist_ssl.eval.features``), a seeded choice of classes and points per class,
scikit-learn's TSNE to 2-D, and a PNG scatter coloured by class (matplotlib, Agg backend: no display).

    python tools/tsne.py --backbone RUN_DIR|FILE.safetensors --shards SHARDS --out tsne.png
        [--classes 10] [--per-class 100] [--perplexity 30] [--seed 0] [--img-size S]
    python tools/tsne.py --random vit_pico_patch4_28 --img-size 28 --in-chans 1 --shards ... --out ...

Shapes: feats [N, D] (N samples of the shard set, D = backbone.num_features); xy [n, 2] for the
n chosen points.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from dist_ssl.atomic import atomic_write
from dist_ssl.data.errors import DataError
from dist_ssl.data.loader import build_eval_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.eval.features import EvalError, extract_features, load_frozen_backbone, resolve_backbone_path
from dist_ssl.models import ModelConfig, create_backbone

__all__ = ["choose_points", "embed_2d", "plot_embedding", "main"]

PROG = "tsne"
log = logging.getLogger(PROG)


def choose_points(labels: np.ndarray, num_classes: int, per_class: int, seed: int,
                  classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Row indices of at most ``per_class`` points of each of ``num_classes`` classes.

    The classes are ``classes`` if given, else a seeded random choice among those present
    (Figure 2: 10 of Flowers' 102), returned sorted; the points of a class a seeded random
    choice. The same (labels, arguments) give the same rows.
    """
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    if classes is None:
        classes = np.sort(rng.choice(present, size=min(num_classes, len(present)), replace=False))
    missing = sorted(set(int(c) for c in classes) - set(present.tolist()))
    if missing:
        raise EvalError(f"classes {missing} have no sample in the shard set")
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        rows.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return np.concatenate(rows)


def embed_2d(feats: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """[n, D] -> [n, 2] with scikit-learn's TSNE on L2-normalised features (the cosine geometry
    k-NN evaluation uses), PCA initialisation; perplexity capped below n / 3 as t-SNE needs."""
    from sklearn.manifold import TSNE

    n = feats.shape[0]
    if n < 4:
        raise EvalError(f"t-SNE needs at least 4 points, got {n}")
    x = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3.0), init="pca",
                random_state=seed, max_iter=1000)
    return tsne.fit_transform(x.astype(np.float64))


def plot_embedding(xy: np.ndarray, labels: np.ndarray, path: str | Path, *, class_names: Sequence[str],
                   title: str = "", size_px: int = 800, dpi: int = 100) -> Path:
    """Scatter of ``xy`` [n, 2] coloured by class (tab10 / tab20 colours), legend with the class
    names, written atomically as a ``size_px`` x ``size_px`` PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    try:
        for i, c in enumerate(classes):
            pts = xy[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=12, color=cmap(i % cmap.N), label=class_names[int(c)],
                       linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=10)
        ax.legend(loc="best", fontsize=7, markerscale=1.5, frameon=True)
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


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
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except (EvalError, DataError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
