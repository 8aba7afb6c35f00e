"""Frozen-backbone evaluation: k-NN against a brute-force reference, linear probe, feature
extraction over ranks, and ``tools/eval.py`` end to end on real Fashion-MNIST shards
(the CLI under ``torchrun`` with 2 gloo ranks, compared with a single-process run).

Legend: [N, D] train features, [M, D] test features, C classes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ssl.data.loader import build_eval_loader
from dist_ssl.eval.cli_eval import main
from dist_ssl.eval.features import extract_features, gather_sorted, local_features
from dist_ssl.eval.knn import knn_accuracy, knn_votes, rank_classes
from dist_ssl.eval.linear_probe import LinearProbeConfig, linear_probe, train_linear
from dist_ssl.models import ModelConfig, create_backbone, export_backbone

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()  # small tensors on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_knn(train, labels, test, num_classes, k, t):
    """Brute force, float64 Python: ranked class lists [M][C] (ties: lower row / class id)."""
    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]
    tr, out = [unit(r) for r in train.double().tolist()], []
    for q in (unit(r) for r in test.double().tolist()):
        sims = [sum(a * b for a, b in zip(q, r)) for r in tr]
        nbrs = sorted(range(len(tr)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * num_classes
        for j in nbrs:  # decreasing similarity, like the implementation
            votes[int(labels[j])] += math.exp(sims[j] / t)
        out.append(sorted(range(num_classes), key=lambda c: (-votes[c], c)))
    return out


def tied_features(n, seed):
    """[n, 16] rows with four +-1 entries: norm 2, so every cosine is an exact multiple of 1/4
    and many are equal -> neighbour and class ties with exact float arithmetic."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 16)
    for i in range(n):
        cols = torch.randperm(16, generator=g)[:4]
        x[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


@pytest.mark.parametrize("kind", ["gaussian", "tied"])
@pytest.mark.parametrize("k,t", [(1, 0.07), (7, 0.07), (20, 0.5)])
def test_knn_matches_brute_force(kind, k, t):
    g = torch.Generator().manual_seed(k)
    make = (lambda n: torch.randn(n, 8, generator=g)) if kind == "gaussian" else \
        (lambda n: tied_features(n, seed=n + k))
    train, test = make(150), make(40)
    labels = torch.randint(0, 7, (150,), generator=g)
    got = rank_classes(knn_votes(train, labels, test, 7, k=k, temperature=t, chunk_size=16))
    assert got.tolist() == reference_knn(train, labels, test, 7, k, t)


def test_knn_ties_are_deterministic():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are equal
    q = torch.tensor([[1.0, 0.0]])
    # k=1: the lower train row wins a similarity tie, whatever its class.
    assert rank_classes(knn_votes(v, torch.tensor([3, 1, 0]), q, 4, k=1))[0, 0] == 3
    assert rank_classes(knn_votes(v, torch.tensor([1, 3, 0]), q, 4, k=1))[0, 0] == 1
    # k=2: classes 3 and 1 get equal scores; the lower class id ranks first, unvoted last.
    assert rank_classes(knn_votes(v, torch.tensor([3, 1, 0]), q, 4, k=2))[0].tolist() == [1, 3, 0, 2]


def test_knn_chunking_invariance_and_accuracy_levels():
    train, test = tied_features(300, 0), tied_features(90, 1)
    labels = torch.arange(300) % 5
    runs = [knn_votes(train, labels, test, 5, chunk_size=c) for c in (1, 7, 90, 1000)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    g = torch.Generator().manual_seed(0)  # planted classes: tight clusters around 10 centres
    centres = torch.randn(10, 32, generator=g)
    ytr, yte = torch.arange(1000) % 10, torch.arange(300) % 10
    xtr = centres[ytr] + 0.2 * torch.randn(1000, 32, generator=g)
    xte = centres[yte] + 0.2 * torch.randn(300, 32, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, 10, chunk_size=64) == {"top1": 1.0, "top5": 1.0}
    noise = knn_accuracy(torch.randn(1000, 32, generator=g), ytr,
                         torch.randn(300, 32, generator=g), yte, 10)
    assert noise["top1"] < 0.2 and noise["top5"] < 0.7  # chance: 0.1 / 0.5


def linear_data(n, seed, scale=True):
    """x [n, 16] badly scaled/shifted per column; y = argmax of a random linear map (C=5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x @ torch.randn(16, 5, generator=torch.Generator().manual_seed(99))).argmax(1)
    if scale:
        x = x * torch.logspace(-3, 3, 16) + 100.0
    return x, y


def test_linear_probe_fits_separable_data_and_is_deterministic():
    (xtr, ytr), (xte, yte) = linear_data(2000, 0), linear_data(500, 1)
    cfg = LinearProbeConfig(epochs=100, weight_decays=(1e-5,))
    res = linear_probe(xtr, ytr, xte, yte, 5, cfg)
    assert res["top1"] >= 0.95 and res["top5"] == 1.0, res
    assert linear_probe(xtr, ytr, xte, yte, 5, cfg) == res
    x = (xtr - xtr.mean(0)) / xtr.std(0)
    w = [train_linear(x, ytr, 5, cfg, 1e-5).weight for _ in range(2)]
    assert torch.equal(w[0], w[1])
    shuffled = ytr[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    assert linear_probe(xtr, shuffled, xte, yte, 5, cfg)["top1"] < 0.4  # no signal: ~chance


def test_linear_probe_weight_decay_sweep_picks_on_held_out_train():
    (xtr, ytr), (xte, yte) = linear_data(1000, 2), linear_data(300, 3)
    cfg = LinearProbeConfig(epochs=50, weight_decays=(10.0, 1e-5), val_fraction=0.2)
    res = linear_probe(xtr, ytr, xte, yte, 5, cfg)
    assert res["weight_decay"] == 1e-5 and set(res["val_top1"]) == {"10.0", "1e-05"}
    assert res["val_top1"]["1e-05"] > res["val_top1"]["10.0"] and res["top1"] >= 0.9


# ---- real shards -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(fmnist_dir, tmp_path_factory):
    """train: 500 (50 per class), test: 300 random t10k, tiny: 100 random t10k."""
    from dist_ssl.data.shard_writer import write_dataset

    root = tmp_path_factory.mktemp("eval_shards")
    specs = {"train": ("train", "per-class:50", 256), "test": ("test", "random:300", 256),
             "tiny": ("test", "random:100", 64)}
    for name, (split, subset, per_shard) in specs.items():
        write_dataset(f"idx:{fmnist_dir}", root / name, split=split, subset=subset,
                      samples_per_shard=per_shard, seed=0)
    return {name: root / name for name in specs}


def export(path: Path, in_chans: int, **kw) -> Path:
    torch.manual_seed(0)  # a random-init backbone: the CLI must work without training
    model = create_backbone(ModelConfig(name="vit_pico_patch4_28", in_chans=in_chans, **kw))
    return export_backbone(model, path)


def test_extract_features_eval_mode_and_rank_split(shards):
    model = create_backbone(ModelConfig(name="vit_pico", in_chans=1, drop_path=0.5)).train()
    full = [extract_features(model, build_eval_loader(shards["tiny"], 28, 32, in_chans=1,
                                                      num_workers=0), "cpu") for _ in range(2)]
    assert model.training  # restored; and drop-path was off: both passes are equal
    assert torch.equal(full[0][0], full[1][0]) and full[0][0].shape == (100, 96)
    assert full[0][2].tolist() == list(range(100))
    parts = [local_features(model, build_eval_loader(shards["tiny"], 28, 16, rank=r, world_size=3,
                                                     in_chans=1, num_workers=0), "cpu")
             for r in (2, 0, 1)]  # any order of ranks: gather_sorted orders by index
    split = gather_sorted(*(torch.cat(t) for t in zip(*parts)), torch.device("cpu"))
    torch.testing.assert_close(split[0], full[0][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(split[1], full[0][1]) and torch.equal(split[2], full[0][2])


@pytest.mark.dist  # 2 gloo ranks under torchrun
@pytest.mark.timeout(240)
def test_cli_torchrun_two_ranks_equals_single_process(shards, tmp_path):
    run = tmp_path / "run"
    export(run / "backbone.safetensors", in_chans=1)
    common = ["--train", str(shards["train"]), "--test", str(shards["test"]), "--workers", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "eval.py"), "--backbone", str(run), *common,
           "--save-features", str(tmp_path / "f2.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("eval: ") and "_top" in ln]
    assert [ln.split()[1] for ln in lines] == ["knn_top1", "knn_top5", "linear_top1", "linear_top5"]
    res = json.loads((run / "eval_probe.json").read_text())  # default: in the run dir
    assert res["world_size"] == 2 and (res["num_train"], res["num_test"]) == (500, 300)
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        assert 0.0 <= res[key] <= 1.0
    assert res["knn_top1"] > 0.3  # random-init ViT features, 10 classes: chance is 0.1
    single = tmp_path / "single.json"
    assert main(["--backbone", str(run / "backbone.safetensors"), *common, "--out", str(single),
                 "--save-features", str(tmp_path / "f1.safetensors"), "-q"]) == 0
    one = json.loads(single.read_text())
    f1, f2 = load_file(tmp_path / "f1.safetensors"), load_file(tmp_path / "f2.safetensors")
    for key in f1:
        torch.testing.assert_close(f2[key], f1[key], rtol=1e-5, atol=1e-6)
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        assert abs(one[key] - res[key]) < 0.01, key
    print("e2e accuracies:", {k: round(v, 4) for k, v in res.items() if "_top" in k})


def test_cli_rgb_export_at_another_resolution(shards, tmp_path):
    path = export(tmp_path / "exports" / "rgb.safetensors", in_chans=3)
    out = tmp_path / "elsewhere" / "knn.json"
    out.parent.mkdir()
    argv = ["--backbone", str(path), "--train", str(shards["tiny"]), "--test", str(shards["tiny"]),
            "--img-size", "32", "--methods", "knn", "--knn-k", "1", "--out", str(out),
            "--workers", "0", "-q"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert (res["img_size"], res["native_img_size"], res["in_chans"]) == (32, 28, 3)
    assert "linear_top1" not in res and res["knn_top1"] >= 0.99  # test == train: self-matches
    assert not (path.parent / "eval_probe.json").exists()


@pytest.mark.parametrize("case", ["no_backbone", "no_manifest", "in_chans", "classes"])
def test_cli_errors_are_one_line_exit_2(case, shards, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    train, test = shards["tiny"], shards["tiny"]
    if case != "no_backbone":
        export(run / "backbone.safetensors", in_chans=2 if case == "in_chans" else 1)
    if case == "no_manifest":
        train = tmp_path / "missing_shards"
    if case == "classes":
        test = Path(shutil.copytree(shards["tiny"], tmp_path / "other"))
        manifest = json.loads((test / "manifest.json").read_text())
        manifest["classes"][0] = "not-a-tshirt"
        (test / "manifest.json").write_text(json.dumps(manifest))
    code = main(["--backbone", str(run), "--train", str(train), "--test", str(test), "-q"])
    err = capsys.readouterr().err.strip()
    expected = {"no_backbone": "backbone file not found", "no_manifest": "manifest.json: not found",
                "in_chans": "in_chans=2", "classes": "different classes"}[case]
    assert code == 2 and err.startswith("eval: error: ") and expected in err
    assert "\n" not in err and not (run / "eval_probe.json").exists()
