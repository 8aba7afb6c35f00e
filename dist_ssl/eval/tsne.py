"""t-SNE picture of a backbone's features on a shard set: the IDMM paper's Figure 2.

Cao, Yu & Wu (ECCV 2022), Figure 2: "t-SNE visualization of 10 classes selected from flowers using
DeiT-Tiny", one panel per pre-training method, before and after fine-tuning. Here one panel per
call: frozen pooled features of an export (or of a random initialisation, the "random init." panel)
on a shard set (``dist_ssl.eval.features``), a seeded choice of classes and points per class,
scikit-learn's TSNE to 2-D, and a PNG scatter coloured by class (matplotlib, Agg backend: no display).

    dist-ssl-tsne --backbone RUN_DIR|FILE.safetensors --shards SHARDS --out tsne.png
        [--classes 10] [--per-class 100] [--perplexity 30] [--seed 0] [--img-size S]
    dist-ssl-tsne --random vit_pico_patch4_28 --img-size 28 --in-chans 1 --shards ... --out ...

(the command line is cli_tsne.py; this module holds the steps it runs).

Shapes: feats [N, D] (N samples of the shard set, D = backbone.num_features); xy [n, 2] for the
n chosen points.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dist_ssl.atomic import atomic_write
from dist_ssl.eval.features import EvalError

__all__ = ["choose_points", "embed_2d", "plot_embedding"]


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
