"""Shared pytest fixtures. Data fixtures: real Fashion-MNIST (never skipped) and its shards."""
import os
import socket
from pathlib import Path

import pytest

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Folder with the 4 Fashion-MNIST IDX files (env FASHION_MNIST_DIR or the Debian path)."""
    path = Path(os.environ.get("FASHION_MNIST_DIR", FMNIST_DEFAULT_DIR))
    missing = [f for f in FMNIST_FILES
               if not (path / f).is_file() and not (path / (f + ".gz")).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST IDX files missing in {path} ({', '.join(missing)}): "
                    f"run `apt-get install -y dataset-fashion-mnist` or set FASHION_MNIST_DIR "
                    f"to a folder with the official files", pytrace=False)
    return path


@pytest.fixture(scope="session")
def fmnist2k_shards(fmnist_dir, tmp_path_factory) -> Path:
    """2,040 Fashion-MNIST train images (204 per class) in 8 shards of 256 (last: 248).

    Read-only: copy it before modifying anything.
    """
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("fmnist2k") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, split="train", subset="per-class:204",
                  samples_per_shard=256, seed=0)
    return out


@pytest.fixture(scope="session")
def fmnist_test_shards_small(fmnist_dir, tmp_path_factory) -> Path:
    """500 random Fashion-MNIST test (t10k) images in 4 shards of 128 (last: 116). Read-only."""
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("fmnist_test500") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, split="test", subset="random:500",
                  samples_per_shard=128, seed=0)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core box extra intra-op threads only spin (~10x the CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connect fails the test (nothing may download weights or data)."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_photo_folder(root: Path, classes: int = 3, per_class: int = 32, seed: int = 0,
                      sizes: tuple[int, int] = (150, 300)) -> Path:
    """An image folder of real JPEG photos (q90): seeded crops, scalings and flips of
    scikit-learn's two sample photographs (427x640), sides in ``sizes``."""
    import random

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            src = photos[(c + i) % 2]
            w, h = rng.randint(200, src.width), rng.randint(150, src.height)
            x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
            side = rng.randint(*sizes)
            img = src.crop((x, y, x + w, y + h))
            img = img.resize((side, max(1, round(side * h / w))) if w >= h
                             else (max(1, round(side * w / h)), side), Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """96 real JPEG photos (150-300 px longer side, 3 classes) in 3 shards of 32. Read-only."""
    from dist_ssl.data.shard_writer import write_dataset

    base = tmp_path_factory.mktemp("photos")
    out = base / "shards"
    write_dataset(f"imagefolder:{make_photo_folder(base / 'photos')}", out,
                  samples_per_shard=32, seed=0)
    return out
