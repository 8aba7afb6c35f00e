"""tools/make_shards.py on real data: Fashion-MNIST IDX, JPEG/PNG image folders, CSV lists."""
import gzip
import io
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ssl.data.errors import BadImageError, SourceError, SubsetError
from dist_ssl.data.manifest import load_manifest
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.shard_writer import write_dataset

REPO = Path(__file__).resolve().parents[2]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]


def run_cli(*args, env=None):
    """Run the real CLI from the repo root; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "tools/make_shards.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def read_shards(out_dir):
    """[(shard name, [(member names, {ext: bytes})...])] read with tarfile, in manifest order."""
    m = load_manifest(out_dir)
    shards = []
    for s in m.shards:
        with tarfile.open(Path(out_dir) / s.name) as tf:
            members = list(tf)
            data = [(mm, tf.extractfile(mm).read()) for mm in members]
        samples = [data[i:i + 3] for i in range(0, len(data), 3)]
        shards.append((s, [([mm.name for mm, _ in smp], {mm.name.split(".", 1)[1]: b
                                                          for mm, b in smp}, [mm for mm, _ in smp])
                           for smp in samples]))
    return m, shards


def read_idx_reference(path):
    """Independent IDX reader (the test's ground truth)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(fmnist_dir, stem):
    return next(p for p in (fmnist_dir / stem, fmnist_dir / (stem + ".gz")) if p.is_file())


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist_cli_shards(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fm2k"
    r = run_cli("write", f"idx:{fmnist_dir}", out, "--subset", "per-class:204",
                "--samples-per-shard", "256")
    assert r.returncode == 0, r.stderr
    return out


def test_cli_fmnist_per_class_and_verify(fmnist_cli_shards, fmnist_dir):
    r = run_cli("verify", fmnist_cli_shards)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "2040 samples" in r.stdout
    m, shards = read_shards(fmnist_cli_shards)
    assert (m.num_samples, m.num_classes, m.classes) == (2040, 10, FASHION)
    assert m.class_counts == [204] * 10 and m.subset == "per-class:204" and m.skipped == []
    assert [s.num_samples for s, _ in shards] == [256] * 7 + [248]
    images = read_idx_reference(find(fmnist_dir, "train-images-idx3-ubyte"))
    labels = read_idx_reference(find(fmnist_dir, "train-labels-idx1-ubyte"))
    label_of = {}
    for img, lbl in zip(images, labels):
        label_of.setdefault(img.tobytes(), set()).add(int(lbl))
    ids, per_class = [], Counter()
    for info, samples in shards:
        shard_classes = set()
        for names, parts, members in samples:
            key = names[0].split(".")[0]
            assert names == [f"{key}.cls", f"{key}.idx", f"{key}.png"]  # fixed member order
            assert all(mm.mtime == 0 and mm.uid == 0 and mm.gid == 0 for mm in members)
            idx, cls = int(parts["idx"]), int(parts["cls"])
            assert key == f"{idx:09d}"
            assert info.first_idx <= idx < info.first_idx + info.num_samples
            im = Image.open(io.BytesIO(parts["png"]))
            assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)
            # lossless: the PNG pixels are exactly an IDX row with this label
            assert cls in label_of[np.asarray(im).tobytes()]
            ids.append(idx)
            per_class[cls] += 1
            shard_classes.add(cls)
        assert shard_classes == set(range(10)), f"{info.name} does not mix classes"
    assert sorted(ids) == list(range(2040))
    assert per_class == {c: 204 for c in range(10)}
    assert not list(fmnist_cli_shards.rglob("*.tmp"))


def test_fmnist_deterministic_and_api_equals_cli(fmnist_cli_shards, fmnist2k_shards):
    """Same command twice (CLI and Python API, separate processes) -> identical shards."""
    a, b = load_manifest(fmnist_cli_shards), load_manifest(fmnist2k_shards)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert (fmnist_cli_shards / s.name).read_bytes() == (fmnist2k_shards / s.name).read_bytes()
    assert a.to_dict() == b.to_dict()


def test_other_seed_changes_order_not_counts(fmnist_dir, tmp_path, fmnist_test_shards_small):
    m = write_dataset(f"idx:{fmnist_dir}", tmp_path / "s1", split="test", subset="random:500",
                      samples_per_shard=128, seed=1)
    m0 = load_manifest(fmnist_test_shards_small)
    assert m.num_samples == m0.num_samples == 500 and m.split == "test"
    assert [s.num_samples for s in m.shards] == [128, 128, 128, 116]
    assert [s.sha256 for s in m.shards] != [s.sha256 for s in m0.shards]
    verify_dataset(fmnist_test_shards_small)


# --------------------------------------------------------------------------- image folder
def _crop(img, i):
    y, x = (i * 37) % 300, (i * 53) % 500
    return Image.fromarray(img[y:y + 96, x:x + 128])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Classes a, b, c of real JPEG/PNG crops plus 3 bad files; returns (root, truth).

    truth: relative path -> (class name, ext) for the valid files.
    """
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    root = tmp_path_factory.mktemp("imgs") / "folder"
    truth = {}

    def save(rel, im, fmt, ext):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        truth[rel] = (rel.split("/")[0], ext)

    for i in range(6):
        save(f"a/{i}.jpg", _crop(china, i), "JPEG", "jpg")
        save(f"b/{i}.jpeg", _crop(flower, i), "JPEG", "jpg")
    for i in range(3):
        save(f"c/{i}.png", _crop(china, 10 + i), "PNG", "png")
    save("c/sub/deep.jpg", _crop(flower, 20), "JPEG", "jpg")
    save("c/3.jpg", _crop(flower, 21), "JPEG", "jpg")
    save("c/png_named.jpg", _crop(flower, 22), "PNG", "png")  # real format wins
    good = (root / "a/0.jpg").read_bytes()
    (root / "a/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b/empty.jpg").write_bytes(b"")
    (root / "c/notes.jpg").write_text("this is not an image\n")
    (root / "c/.DS_Store").write_bytes(b"\0junk")  # hidden: ignored entirely
    return root, truth


BAD = {"a/truncated.jpg": "cannot decode", "b/empty.jpg": "empty file",
       "c/notes.jpg": "not an image"}


def test_imagefolder_bytes_copied_bad_files_skipped(image_folder, tmp_path):
    root, truth = image_folder
    out = tmp_path / "out"
    r = run_cli("write", f"imagefolder:{root}", out, "--samples-per-shard", "5")
    assert r.returncode == 0, r.stderr
    assert "skipped 3 bad file(s)" in r.stderr and "Traceback" not in r.stderr
    m, shards = read_shards(out)
    assert m.classes == ["a", "b", "c"] and m.class_counts == [6, 6, 6]
    assert {s.path: s.reason for s in m.skipped}.keys() == BAD.keys()
    for s in m.skipped:
        assert BAD[s.path] in s.reason
    originals = Counter(((root / rel).read_bytes(), m.classes.index(c), ext)
                        for rel, (c, ext) in truth.items())
    written = Counter()
    for _, samples in shards:
        for names, parts, _ in samples:
            (ext,) = set(parts) - {"cls", "idx"}
            written[(parts[ext], int(parts["cls"]), ext)] += 1
    assert written == originals  # every valid file exactly once, byte for byte, right ext
    assert run_cli("verify", out).returncode == 0


def test_imagefolder_strict_names_file(image_folder, tmp_path):
    root, _ = image_folder
    r = run_cli("write", f"imagefolder:{root}", tmp_path / "o", "--strict")
    assert r.returncode == 2
    assert "a/truncated.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
    with pytest.raises(BadImageError, match="truncated.jpg"):
        write_dataset(f"imagefolder:{root}", tmp_path / "o", strict=True)


def test_per_class_subset_replaces_bad_files(image_folder, tmp_path):
    root, _ = image_folder
    # Every class has exactly 6 valid files, so per-class:6 must replace each bad file it
    # tries by the next candidate; bad files after the 6th valid one are never decoded.
    m = write_dataset(f"imagefolder:{root}", tmp_path / "o", subset="per-class:6", seed=3)
    assert m.class_counts == [6, 6, 6]
    assert m.skipped and {s.path for s in m.skipped} <= BAD.keys()
    with pytest.raises(SubsetError, match=r"class 'a' has only 6 valid images"):
        write_dataset(f"imagefolder:{root}", tmp_path / "o2", subset="per-class:7")
    # that failed run wrote no plan or shard: other arguments need no --overwrite
    again = write_dataset(f"imagefolder:{root}", tmp_path / "o2", subset="per-class:5")
    assert again.num_samples == 15
    small = write_dataset(f"imagefolder:{root}", tmp_path / "o3", subset="random:4")
    assert small.num_samples == 4 and sum(small.class_counts) == 4


# --------------------------------------------------------------------------- CSV list
def test_list_source_csv(image_folder, tmp_path):
    root, truth = image_folder
    rows = ["path,label,comment"] + [f"{root.name}/{rel},{'zebra' if c == 'a' else 'ant'},x"
                                     for rel, (c, _) in sorted(truth.items())]
    (root.parent / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    r = run_cli("write", f"list:{root.parent / 'list.csv'}", out)
    assert r.returncode == 0, r.stderr
    m, shards = read_shards(out)
    assert m.classes == ["ant", "zebra"] and m.class_counts == [12, 6]
    jpeg_a = (root / "a/3.jpg").read_bytes()
    hits = [int(p["cls"]) for _, smp in shards for _, p, _ in smp if p.get("jpg") == jpeg_a]
    assert hits == [1]


@pytest.mark.parametrize("csv_text, message", [
    ("file,label\nx.jpg,a\n", "missing column 'path'"),
    ("path,name\nx.jpg,a\n", "missing column 'label'"),
    ("path,label\nnope.jpg,a\n", "line 2: file not found: nope.jpg"),
    ("path,label\nok.png,\n", "line 2: empty label"),
    ("path,label\n", "no rows"),
])
def test_list_source_errors(tmp_path, csv_text, message):
    Image.new("L", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "l.csv").write_text(csv_text)
    with pytest.raises(SourceError, match=message):
        write_dataset(f"list:{tmp_path / 'l.csv'}", tmp_path / "out")


def test_source_errors_one_line_exit_2(tmp_path):
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "dog").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "folder" / "cat" / "x.png")
    (tmp_path / "nocls").mkdir()
    (tmp_path / "l.csv").write_text("file,label\n")
    cases = [(f"imagefolder:{tmp_path / 'folder'}", "class folder 'dog' is empty"),
             (f"imagefolder:{tmp_path / 'nocls'}", "no class folders"),
             (f"imagefolder:{tmp_path / 'missing'}", "does not exist"),
             (f"zip:{tmp_path}", "unknown SOURCE scheme"),
             (f"list:{tmp_path / 'l.csv'}", "missing column 'path'"),
             (f"idx:{tmp_path / 'nocls'}", "train-images-idx3-ubyte")]
    for source, message in cases:
        r = run_cli("write", source, tmp_path / "out") if source.startswith("zip") else None
        if r is not None:
            assert r.returncode == 2 and "Traceback" not in r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith("make_shards: error: ")
        with pytest.raises(SourceError, match=message):
            write_dataset(source, tmp_path / "out")
    r = run_cli("write", f"imagefolder:{tmp_path / 'folder'}", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'dog' is empty" in r.stderr
    assert not (tmp_path / "out").exists()  # errors in SOURCE are found before writing


def test_imagefolder_workers_2_byte_identical(image_folder, tmp_path):
    root, _ = image_folder
    one = write_dataset(f"imagefolder:{root}", tmp_path / "w1", samples_per_shard=4)
    two = write_dataset(f"imagefolder:{root}", tmp_path / "w2", samples_per_shard=4, workers=2)
    assert one.to_dict() == two.to_dict() and len(two.skipped) == 3
    for s in one.shards:
        assert (tmp_path / "w1" / s.name).read_bytes() == (tmp_path / "w2" / s.name).read_bytes()


def test_out_dir_inside_image_folder_refused(image_folder):
    from dist_ssl.data.errors import OutDirError

    root, _ = image_folder
    with pytest.raises(OutDirError, match="inside the image folder"):
        write_dataset(f"imagefolder:{root}", root / "shards")
    assert not (root / "shards").exists()


def test_webdataset_reads_shards(fmnist2k_shards):
    import webdataset as wds

    m = load_manifest(fmnist2k_shards)
    url = str(fmnist2k_shards / m.shards[1].name)
    samples = list(wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node))
    assert len(samples) == m.shards[1].num_samples
    first = m.shards[1].first_idx
    for i, s in enumerate(samples):
        assert s["__key__"] == f"{first + i:09d}" and int(s["idx"]) == first + i
        assert 0 <= int(s["cls"]) < 10 and s["png"][:8] == b"\x89PNG\r\n\x1a\n"
