"""make_shards --resize SHORT_SIDE: smaller stored images, recorded, verified, resumable, read."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo_folder
from dist_ssl.data.errors import DataError, OutDirError
from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.data.shard_resize import resize_image, target_size
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.shard_writer import FAIL_AFTER_ENV, write_dataset
from dist_ssl.data.views import CropGroup, ViewSpec

REPO = Path(__file__).resolve().parents[2]


def _members(out: Path) -> dict:
    """idx -> (ext, bytes) of every image in the dataset's shards."""
    found = {}
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if ext not in ("cls", "idx"):
                    found[int(key)] = (ext, tf.extractfile(m).read())
    return found


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 JPEG photos with longer sides 100-300 px, plus a big PNG, a 16-bit PNG and a JPEG
    whose EXIF says 'rotate 90'."""
    root = make_photo_folder(tmp_path_factory.mktemp("src") / "photos", classes=2, per_class=12,
                             sizes=(100, 300))
    big = Image.open(next((root / "class0").glob("*.jpg"))).convert("RGB")
    big.resize((400, 300)).save(root / "class0" / "big.png")
    ramp = (np.arange(180 * 240, dtype=np.uint32).reshape(180, 240) * 5 % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(root / "class1" / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (320, 200), (200, 30, 30)).save(root / "class1" / "rotated.jpg",
                                                     exif=exif.tobytes())
    return root


@pytest.fixture(scope="module")
def resized(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("resized") / "out"
    write_dataset(f"imagefolder:{photos}", out, samples_per_shard=10, resize=120)
    return out


def test_resized_shards_recorded_sized_and_verified(photos, resized):
    m = load_manifest(resized)
    assert (m.resize, m.quality, m.num_samples) == (120, 90, 27)
    assert m.args()["resize"] == 120
    verify_dataset(resized)  # sha256, ids, classes, every image decodes as its extension says
    sources = {p.read_bytes() for p in photos.rglob("*.*")}
    kept = 0
    for idx, (ext, data) in _members(resized).items():
        size = Image.open(io.BytesIO(data)).size
        if data in sources:  # small originals: copied byte for byte, never upsampled
            assert min(size) <= 120, (idx, size)
            kept += 1
        else:  # the others re-encoded as JPEG with the shorter side 120
            assert ext == "jpg" and min(size) == 120, (idx, ext, size)
    assert 3 <= kept <= 27 - 3


def test_resize_keeps_aspect_orientation_and_depth(photos):
    assert target_size(500, 375, 160) == (213, 160) and target_size(375, 500, 160) == (160, 213)
    rotated = resize_image((photos / "class1" / "rotated.jpg").read_bytes(), 100, 90)
    assert Image.open(io.BytesIO(rotated)).size == (100, 160)  # EXIF rotation baked in
    deep = Image.open(io.BytesIO(resize_image((photos / "class1" / "deep.png").read_bytes(),
                                              90, 95)))
    assert deep.mode == "L" and deep.size == (120, 90)
    arr = np.asarray(deep, dtype=float)  # scaled 16 -> 8 bits (a clip would be ~all 255)
    assert 60 < arr.mean() < 200 and arr.std() > 30
    small = (photos / "class0" / "big.png").read_bytes()
    assert resize_image(small, 300, 90) is None  # shorter side 300: not resized


def test_resized_shards_train(resized):
    spec = ViewSpec([CropGroup(2, 48, (0.14, 1.0)), CropGroup(2, 24, (0.05, 0.4))], "simclr")
    loader = build_train_loader(resized, spec, 9, num_workers=0, seed=0, uint8_views=True)
    batches = list(loader)
    assert len(batches) == 3
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(27))
    views = loader.to_device(batches[0], "cpu")["views"]
    assert [tuple(v.shape) for v in views] == [(9, 3, 48, 48)] * 2 + [(9, 3, 24, 24)] * 2


def test_resized_crash_resume_byte_identical_and_args_refused(photos, resized, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "out"
    args = dict(source=f"imagefolder:{photos}", samples_per_shard=10, resize=120)
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(out_dir=out, **args)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    write_dataset(out_dir=out, **args)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "manifest.json"):
        assert (out / name).read_bytes() == (resized / name).read_bytes(), name
    with pytest.raises(OutDirError, match="--resize was 120, now 160"):
        write_dataset(out_dir=out, **dict(args, resize=160))
    with pytest.raises(OutDirError, match="--quality was 90, now 80"):
        write_dataset(out_dir=out, **args, quality=80)
    with pytest.raises(OutDirError, match="--resize was 120, now \\(none\\)"):
        write_dataset(out_dir=out, **dict(args, resize=None))


def test_byte_copy_stays_the_default_and_bad_flags_are_one_line_errors(photos, tmp_path):
    m = write_dataset(f"imagefolder:{photos}", tmp_path / "copy", samples_per_shard=30)
    assert m.resize is None and m.quality is None and "resize" not in m.args()
    sources = sorted(p.read_bytes() for p in photos.rglob("*.*"))
    assert sorted(d for _, d in _members(tmp_path / "copy").values()) == sources
    with pytest.raises(DataError, match="--quality applies only with --resize"):
        write_dataset(f"imagefolder:{photos}", tmp_path / "q", quality=80)
    for argv, message in ((["--resize", "0"], "--resize must be an integer >= 1"),
                          (["--resize", "64", "--quality", "101"], "--quality must be")):
        r = subprocess.run([sys.executable, "tools/make_shards.py", "write",
                            f"imagefolder:{photos}", str(tmp_path / "cli"), *argv],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
