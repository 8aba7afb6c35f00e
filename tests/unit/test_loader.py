"""The train/eval loaders on real Fashion-MNIST shards, with real DataLoader workers."""
import io
import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import dist_ssl.data.loader as loader_mod
from dist_ssl.data.loader import build_eval_loader, build_train_loader
from dist_ssl.data.views import CropGroup, ViewSpec

N = 2040
# Cheap multi-crop spec (two group sizes, DINO-style per-group overrides) for speed.
SPEC = ViewSpec([CropGroup(2, 24, (0.4, 1.0), blur_p=1.0),
                 CropGroup(2, 12, (0.1, 0.4), blur_p=0.5, solarize_p=0.2)],
                policy="dino", in_chans=1)
CHEAP = ViewSpec([CropGroup(1, 8)], policy="supervised", in_chans=1)  # for counting tests


def _tar_truth(shard_dir):
    """id -> (class, image bytes) read straight from the tars."""
    out = {}
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            if name.endswith(".idx"):
                key = name[:-4]
                out[int(data)] = (int(members[key + ".cls"]), members[key + ".png"])
    return out


@pytest.fixture(scope="module")
def truth(fmnist2k_shards):
    return _tar_truth(fmnist2k_shards)


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def reference(fmnist2k_shards):
    """Epoch 1 of an uninterrupted run (seed 7, 2 workers, multi-crop SPEC)."""
    return _epoch(build_train_loader(fmnist2k_shards, SPEC, 64, num_workers=2, seed=7), 1)


def test_one_epoch_covers_every_id_labels_match(fmnist2k_shards, truth):
    loader = build_train_loader(fmnist2k_shards, CHEAP, 64, num_workers=2, seed=7)
    assert (len(loader), loader.num_samples, loader.num_classes) == (32, N, 10)
    batches = _epoch(loader, 0)
    assert len(batches) == 32
    ids = torch.cat([b["index"] for b in batches])
    counts = Counter(ids.tolist())
    assert set(counts) == set(range(N))
    assert sum(counts.values()) - N == 32 * 64 - N  # documented padding: 8 repeats
    labels = torch.cat([b["label"] for b in batches])
    assert all(truth[i][0] == lab for i, lab in zip(ids.tolist(), labels.tolist()))
    order1 = torch.cat([b["index"] for b in _epoch(loader, 1)])
    assert not torch.equal(ids, order1)  # reshuffled every epoch


def test_multicrop_batch_layout(reference):
    assert len(reference) == 32
    b = reference[0]
    assert [tuple(v.shape) for v in b["views"]] == [(64, 1, 24, 24)] * 2 + [(64, 1, 12, 12)] * 2
    assert b["index"].dtype == b["label"].dtype == torch.long
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in b["views"])
    assert not torch.equal(b["views"][0], b["views"][1])


def test_eval_loader_pixels_and_ids_exact(fmnist2k_shards, truth):
    loader = build_eval_loader(fmnist2k_shards, 28, 100, num_workers=2, in_chans=1,
                               crop_pct=1.0, mean=(0.0,), std=(1.0,))
    batches = list(loader)
    assert len(batches) == len(loader) == 21 and batches[-1]["index"].numel() == 40
    ids = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(ids) == list(range(N))
    for b in batches[::5]:
        for i, x in zip(b["index"].tolist()[:8], b["views"][0]):
            ref = np.asarray(Image.open(io.BytesIO(truth[i][1])), dtype=np.float32) / 255
            assert torch.equal(x[0], torch.from_numpy(ref))


def test_eval_loader_splits_ranks_exactly(fmnist2k_shards):
    seen = []
    for rank in range(3):
        loader = build_eval_loader(fmnist2k_shards, 8, 64, rank=rank, world_size=3,
                                   num_workers=2, in_chans=1)
        ids = torch.cat([b["index"] for b in loader]).tolist()
        assert len(ids) == loader.rank_num_samples(rank) == N // 3
        seen += ids
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("step", [25, 26])  # odd/even: DataLoader worker 0 plays stream 1/0
def test_mid_epoch_resume_bit_identical(fmnist2k_shards, reference, step):
    ref = reference
    resumed = build_train_loader(fmnist2k_shards, SPEC, 64, num_workers=2, seed=7)
    resumed.set_position(1, step)
    got = list(resumed)
    assert len(got) == len(ref) - step
    assert resumed.position == (1, len(ref))
    for a, b in zip(ref[step:], got):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))


def test_uint8_views_then_normalize_equal_float_path(fmnist2k_shards, reference):
    loader = build_train_loader(fmnist2k_shards, SPEC, 64, num_workers=2, seed=7,
                                uint8_views=True)
    loader.set_position(1, 30)
    got = list(loader)
    assert len(got) == 2 and got[0]["views"][0].dtype == torch.uint8
    for a, b in zip(reference[30:], got):
        assert all(torch.equal(x, loader.normalize(y)) for x, y in zip(a["views"], b["views"]))


def _random_rotate(img):  # module level: picklable for the forkserver workers
    import random
    return img.rotate(random.uniform(-40, 40))


def test_global_rng_hook_through_workers_is_reproducible(fmnist2k_shards):
    spec = ViewSpec([CropGroup(2, 16)], policy="supervised", in_chans=1, hook=_random_rotate)
    runs = []
    for _ in range(2):
        loader = build_train_loader(fmnist2k_shards, spec, 64, num_workers=2, seed=1)
        loader.set_position(0, 29)
        runs.append(list(loader))
    assert len(runs[0]) == 3
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))


def test_resume_skips_without_decoding(fmnist2k_shards, monkeypatch):
    calls = []
    real = loader_mod.decode_views
    monkeypatch.setattr(loader_mod, "decode_views",
                        lambda s, *a: calls.append(1) or real(s, *a))
    loader = build_train_loader(fmnist2k_shards, CHEAP, 64, num_workers=0, seed=0)
    loader.set_position(0, 29)
    assert len(list(loader)) == 3
    assert len(calls) == 3 * 64


def test_position_validation(fmnist2k_shards):
    loader = build_train_loader(fmnist2k_shards, CHEAP, 64, num_workers=0)
    with pytest.raises(ValueError):
        loader.set_position(0, 33)
    loader.set_position(2, 32)
    assert list(loader) == [] and loader.position == (2, 32)


def _corrupt_copy(src, dst, bad_ids=(), truncate=None):
    """Copy a shard dir, replacing the image bytes of ``bad_ids``; optionally cut one tar."""
    dst.mkdir()
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    bad = {f"{i:09d}.png" for i in bad_ids}
    for path in sorted(src.glob("shard-*.tar")):
        with tarfile.open(path) as tin:
            if not bad & set(tin.getnames()):
                shutil.copy(path, dst / path.name)
                continue
        with tarfile.open(path) as tin, tarfile.open(dst / path.name, "w") as tout:
            for m in tin:
                data = tin.extractfile(m).read()
                if m.name in bad:
                    data = b"this is not a png"
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
    if truncate is not None:  # keep the first 40 KB of this shard: later samples vanish
        p = dst / truncate
        p.write_bytes(p.read_bytes()[:40_000])


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_replaced_counts_kept(fmnist2k_shards, tmp_path, caplog, workers):
    bad_ids = [3, 300, 301, 1000]
    _corrupt_copy(fmnist2k_shards, tmp_path / "bad", bad_ids, truncate="shard-000005.tar")
    loader = build_train_loader(tmp_path / "bad", CHEAP, 64, num_workers=workers, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 32
    assert all(b["index"].numel() == 64 for b in batches)
    ids = set(torch.cat([b["index"] for b in batches]).tolist())
    assert not ids & set(bad_ids)
    assert not ids & set(range(1280 + 200, 1536))  # the cut end of shard 5
    assert len(ids) > 1700
    if workers == 0:  # worker logs do not reach caplog
        assert "corrupt" in caplog.text


def test_whole_batch_corrupt_uses_next_valid(fmnist2k_shards, tmp_path):
    _corrupt_copy(fmnist2k_shards, tmp_path / "bad", range(0, 256))  # all of shard 0
    loader = build_train_loader(tmp_path / "bad", CHEAP, 16, num_workers=0, seed=0)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) and all(b["index"].numel() == 16 for b in batches)
    assert min(torch.cat([b["index"] for b in batches]).tolist()) >= 256
