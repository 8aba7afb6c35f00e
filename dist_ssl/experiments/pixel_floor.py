"""The raw-pixel floor of a data set: scikit-learn classifiers on the pixels themselves.

A learned representation that does not beat a linear model or k-NN on raw pixels is not a
result, so every results table carries these rows. Pixels come straight from the shard sets
(every image decoded once, converted to one mode: grayscale if the first image is, else RGB;
resized to ``size`` x ``size`` when given, else all images must share one size), scaled to
[0, 1] and flattened: ``LogisticRegression(C)`` (lbfgs, multinomial) and
``KNeighborsClassifier(k)`` (Euclidean), fitted on train, scored on test.

The result is cached in ``<root>/pixel_floor/<dataset>.json`` with the inputs that determine it
(shard manifests' fingerprints, size, C, k, max_train) and recomputed when any of them changes.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from dist_ssl.atomic import atomic_write_json
from dist_ssl.experiments.spec import PixelFloor
from dist_ssl.errors import UserError

log = logging.getLogger(__name__)
_GRAY = ("1", "L", "LA", "I", "I;16", "F")  # one-channel modes (a palette image "P" counts as RGB)


class FloorError(UserError, ValueError):
    """The floor cannot be computed (one line)."""


def load_pixels(shard_dir: str | Path, size: Optional[int], max_images: Optional[int] = None,
                mode: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(X [n, S*S*C] float32 in [0, 1], y [n] int64, mode) in instance-id order."""
    from PIL import Image

    from dist_ssl.data.decode import SampleError, decode_sample, read_range
    from dist_ssl.data.manifest import load_manifest

    manifest = load_manifest(shard_dir)
    rows, labels, ids, shapes, skipped = [], [], [], set(), 0
    for shard in sorted(manifest.shards, key=lambda s: s.first_idx):
        if max_images is not None and shard.first_idx >= max_images:
            break
        for sample in read_range(Path(shard_dir) / shard.name, 0, shard.num_samples, lambda i: True):
            if max_images is not None and sample is not None and _idx(sample) >= max_images:
                continue  # not decoded
            try:
                img, label, idx = decode_sample(sample)
            except SampleError as e:
                skipped += 1
                log.warning("%s: %s (skipped)", shard_dir, e)
                continue
            if mode is None:
                mode = "L" if img.mode in _GRAY else "RGB"
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            shapes.add(img.size)
            if len(shapes) > 1:
                raise FloorError(f"{shard_dir}: images differ in size {sorted(shapes)[:2]}: set "
                                 "report.pixel_floor.size")
            rows.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
            labels.append(label)
            ids.append(idx)
    if not rows:
        raise FloorError(f"{shard_dir}: no readable images")
    order = np.argsort(ids)
    return np.stack(rows)[order], np.asarray(labels, dtype=np.int64)[order], mode


def _idx(sample: dict) -> int:
    try:
        return int(sample["idx"])
    except (KeyError, ValueError):
        return -1  # let decode_sample report it


def compute_floor(train: str | Path, test: str | Path, cfg: PixelFloor) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    t0 = time.perf_counter()
    x_tr, y_tr, mode = load_pixels(train, cfg.size, cfg.max_train)
    x_te, y_te, _ = load_pixels(test, cfg.size, mode=mode)
    if x_tr.shape[1] != x_te.shape[1]:
        raise FloorError(f"train and test images differ in size ({x_tr.shape[1]} vs {x_te.shape[1]} "
                         "values): set report.pixel_floor.size")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        logreg = LogisticRegression(C=cfg.C, max_iter=1000).fit(x_tr, y_tr)
    knn = KNeighborsClassifier(n_neighbors=cfg.k).fit(x_tr, y_tr)
    side = int(round((x_tr.shape[1] / (1 if mode == "L" else 3)) ** 0.5))
    return {"logreg_top1": float((logreg.predict(x_te) == y_te).mean()),
            "knn_top1": float((knn.predict(x_te) == y_te).mean()),
            "logreg_converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
            "num_train": int(len(y_tr)), "num_test": int(len(y_te)),
            "pixels": f"{side}x{side} {'gray' if mode == 'L' else 'RGB'}", "C": cfg.C, "k": cfg.k,
            "seconds": round(time.perf_counter() - t0, 1)}


def _key(train: str, test: str, cfg: PixelFloor) -> dict:
    from dist_ssl.data.manifest import load_manifest

    return {"train": str(Path(train).resolve()), "test": str(Path(test).resolve()),
            "train_fingerprint": load_manifest(train).fingerprint,
            "test_fingerprint": load_manifest(test).fingerprint,
            "size": cfg.size, "C": cfg.C, "k": cfg.k, "max_train": cfg.max_train}


def cached_floor(cache_dir: Path, dataset: str, train: str, test: str, cfg: PixelFloor) -> dict:
    """The floor of one data set, from the cache when its inputs are unchanged."""
    key = _key(train, test, cfg)
    path = cache_dir / f"{dataset}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["result"]
    except (OSError, ValueError, AttributeError):
        pass
    result = compute_floor(train, test, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "result": result})
    return result
