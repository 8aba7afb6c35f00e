"""tools/tsne.py (dist_ssl.eval.cli_tsne, dist_ssl.eval.tsne): the IDMM paper's Figure 2 on real Fashion-MNIST shards."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dist_ssl.eval.features import EvalError
from dist_ssl.eval.cli_tsne import main
from dist_ssl.eval.tsne import choose_points, embed_2d
from dist_ssl.models import ModelConfig, create_backbone, export_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

# matplotlib's tab10, the colours of up to 10 classes, as 0-255 RGB
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def test_choose_points_caps_each_class_and_is_seeded():
    labels = np.repeat(np.arange(6), [5, 40, 40, 40, 40, 40])
    rows = choose_points(labels, num_classes=4, per_class=10, seed=3)
    assert np.array_equal(rows, choose_points(labels, 4, 10, seed=3))
    chosen = np.unique(labels[rows])
    assert len(chosen) == 4 and len(np.unique(rows)) == len(rows)
    for c in chosen:
        assert (labels[rows] == c).sum() == min(10, (labels == c).sum())
    given = choose_points(labels, 4, 10, seed=3, classes=[0, 5])
    assert sorted(np.unique(labels[given])) == [0, 5] and (labels[given] == 0).sum() == 5
    with pytest.raises(EvalError, match=r"classes \[9\] have no sample"):
        choose_points(labels, 4, 10, seed=0, classes=[9])


def test_embedding_keeps_separated_clusters_apart():
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 16)) * 5
    feats = np.concatenate([c + g.normal(size=(20, 16)) * 0.3 for c in centres])
    labels = np.repeat(np.arange(3), 20)
    xy = embed_2d(feats, perplexity=30, seed=0)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()  # every point's nearest neighbour is of its class


def test_png_of_an_export_on_real_shards(fmnist_test_shards_small, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1))
    export_backbone(model, tmp_path / "backbone.safetensors")
    out = tmp_path / "tsne.png"
    assert main(["--backbone", str(tmp_path), "--shards", str(fmnist_test_shards_small), "--out", str(out),
                 "--classes", "5", "--per-class", "20", "--size", "400", "--workers", "0", "-q"]) == 0
    img = Image.open(out)
    img.load()  # decodes
    assert img.format == "PNG" and img.size == (400, 400)
    counts = Counter(map(tuple, np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()))
    # one colour per class: 20 markers each (+ the legend's), ~190-210 px per class measured at 400 px
    assert all(counts[c] > 100 for c in TAB10[:5]), [counts[c] for c in TAB10]
    # and no more classes than chosen (gray, TAB10[7], is also the text's anti-aliasing)
    assert all(counts[c] < 30 for i, c in enumerate(TAB10[5:], 5) if i != 7), [counts[c] for c in TAB10]
    assert main(["--backbone", str(tmp_path), "--shards", str(fmnist_test_shards_small),
                 "--out", str(tmp_path / "x.jpg")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tsne: error: --out {tmp_path / 'x.jpg'}: expected a .png file"
