"""High-depth images and EXIF orientation, from image files through make_shards and the loader.

One class folder per kind of file, so the label names the file: a 16-bit PNG, float TIFFs in
[0, 1] and in [-200, 1000], a float TIFF with NaN (refused at sharding time), and a real JPEG whose
EXIF Orientation tag (6: rotate 90 degrees clockwise to display) the loader must apply. Every
image's short side is 8 px, so the eval loader (size 8, crop_pct 1, mean 0, std 1) only center
crops: its pixels are compared exactly with the documented 8-bit conversion.
"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dist_ssl.data.canonical_image import UnsupportedImage, to_8bit
from dist_ssl.data.loader import build_eval_loader
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.shard_writer import write_dataset

ORIENTATION = 0x0112  # EXIF tag


def _gradient16():  # [12, 8] spanning most of the 16-bit range
    return (np.arange(96, dtype=np.uint32).reshape(12, 8) * 683).astype(np.uint16)


def _float01():
    return np.linspace(0, 1, 80, dtype=np.float32).reshape(10, 8)


def _float1000():
    return np.linspace(-200, 1000, 96, dtype=np.float32).reshape(8, 12)


def _jpeg_pixels():  # stored 16 wide x 8 tall; displayed upright as 8 x 16
    rgb = np.zeros((8, 16, 3), dtype=np.uint8)
    rgb[:, :8, 0] = 255   # left half red
    rgb[:4, 8:, 2] = 255  # top right quarter blue
    return rgb


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("canon") / "images"
    for name in ("a16", "f01", "f1000", "jpg"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_gradient16()).save(root / "a16" / "x.png")
    assert Image.open(root / "a16" / "x.png").mode == "I;16"
    Image.fromarray(_float01()).save(root / "f01" / "x.tif")
    Image.fromarray(_float1000()).save(root / "f1000" / "x.tif")
    nan = _float01().copy()
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(root / "f01" / "nan.tif")  # in a class with a valid image
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(_jpeg_pixels()).save(root / "jpg" / "x.jpg", quality=95, exif=exif)
    return root


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("canon") / "shards"
    write_dataset(f"imagefolder:{source}", out, samples_per_shard=2)
    return out


def _expected(source):
    """label -> the 8-bit gray image the loader must see (before its 8x8 center crop)."""
    v16 = _gradient16() >> 8
    f01 = np.rint(_float01().astype(np.float64) * 255)
    f = _float1000().astype(np.float64)
    f1000 = np.rint((f - f.min()) * (255 / (f.max() - f.min())))
    upright = ImageOps.exif_transpose(Image.open(source / "jpg" / "x.jpg"))
    jpg = np.asarray(upright.convert("L"))
    assert jpg.shape == (16, 8)  # the tag really turns it
    return {0: v16, 1: f01, 2: f1000, 3: jpg}


def _center8(a):
    top, left = int(round((a.shape[0] - 8) / 2)), int(round((a.shape[1] - 8) / 2))
    return a[top:top + 8, left:left + 8]


def test_nan_float_image_is_refused_at_sharding_with_a_reason(shards):
    from dist_ssl.data.manifest import load_manifest

    m = load_manifest(shards)
    assert [(s.path, s.reason) for s in m.skipped] == [
        ("f01/nan.tif", "unsupported pixels: float pixels with NaN or inf values")]
    assert m.class_counts == [1, 1, 1, 1]
    verify_dataset(shards)  # every shard decodes through the same conversion


def test_loader_sees_8bit_upright_pixels(shards, source):
    expected = _expected(source)
    loader = build_eval_loader(shards, 8, 4, in_chans=1, crop_pct=1.0, mean=(0.0,), std=(1.0,),
                               num_workers=0)
    seen = {}
    for batch in loader:
        for label, view in zip(batch["label"].tolist(), batch["views"][0]):
            seen[label] = torch.round(view[0] * 255).to(torch.uint8).numpy()
    assert sorted(seen) == sorted(expected)
    names = ["16-bit png", "float [0, 1]", "float [-200, 1000]", "exif-rotated jpeg"]
    wrong = [names[label] for label, want in expected.items()
             if not np.array_equal(seen[label], _center8(want).astype(np.uint8))]
    assert wrong == []


@pytest.mark.parametrize("mode, values, reason", [
    ("I", np.array([[-1, 5]], dtype=np.int32), "outside the 16-bit range"),
    ("I", np.array([[0, 70000]], dtype=np.int32), "outside the 16-bit range"),
    ("F", np.array([[0.5, np.inf]], dtype=np.float32), "NaN or inf"),
])
def test_unscalable_pixels_are_refused(mode, values, reason):
    with pytest.raises(UnsupportedImage, match=reason):
        to_8bit(Image.fromarray(values))
    with pytest.raises(UnsupportedImage, match="La cannot be converted"):
        to_8bit(Image.new("La", (2, 2)))


def test_conversion_rules():
    assert np.asarray(to_8bit(Image.fromarray(np.array([[0, 257 * 7, 65535]], np.int32)))).tolist() == [[0, 7, 255]]
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 512, 65535], ">u2").tobytes())
    assert np.asarray(to_8bit(big_endian)).tolist() == [[0, 2, 255]]
    kept = np.array([[0.0, 2.0, 254.6]], np.float32)  # already in [0, 255]: kept, rounded
    assert np.asarray(to_8bit(Image.fromarray(kept))).tolist() == [[0, 2, 255]]
    flat = np.full((2, 2), 300.0, np.float32)  # constant outside [0, 255]: 0
    assert np.asarray(to_8bit(Image.fromarray(flat))).tolist() == [[0, 0], [0, 0]]
    rgb = Image.new("RGB", (2, 2))
    assert to_8bit(rgb) is rgb  # 8-bit modes: no copy
