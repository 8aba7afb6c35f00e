"""Pure parts of the sharding tool: manifest validation, subset selection, IDX reading."""
import gzip
import json

import numpy as np
import pytest

from dist_ssl.data.errors import ManifestError, SourceError, SubsetError
from dist_ssl.data.idx_format import read_idx
from dist_ssl.data.manifest import Manifest, ShardInfo, SkippedFile, load_manifest, save_manifest
from dist_ssl.data.sources import Record
from dist_ssl.data.subsets import candidate_groups, parse_subset, select_valid, shuffle_order


def _manifest(**over):
    kw = dict(num_samples=5, num_classes=2, classes=["a", "b"], class_counts=[3, 2],
              shards=[ShardInfo("shard-000000.tar", 3, "0" * 64, 0),
                      ShardInfo("shard-000001.tar", 2, "1" * 64, 3)],
              source="idx:/x", split="train", subset=None, seed=0, samples_per_shard=3,
              skipped=[SkippedFile("a/bad.jpg", "empty file")], fingerprint="f")
    kw.update(over)
    return Manifest(**kw)


def test_manifest_round_trip(tmp_path):
    save_manifest(tmp_path, _manifest())
    assert load_manifest(tmp_path) == _manifest()
    assert load_manifest(tmp_path / "manifest.json").shards[1].first_idx == 3
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("classes"), "missing field 'classes'"),
    (lambda d: d.update(num_samples="5"), "field 'num_samples' has type str"),
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(class_counts=[3, 3]), "class_counts sum to 6"),
    (lambda d: d["shards"][1].update(first_idx=4), "shard-000001.tar has first_idx=4"),
    (lambda d: d["shards"][0].update(name="../x.tar"), "bad name"),
    (lambda d: d["shards"][0].pop("sha256"), r"shards\[0\] missing field 'sha256'"),
    (lambda d: d.update(num_classes=3), "num_classes=3 but 2 class names"),
])
def test_manifest_errors_name_file_and_problem(tmp_path, edit, message):
    raw = _manifest().to_dict()
    edit(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value) and "\n" not in str(e.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="unreadable"):
        load_manifest(tmp_path)


RECS = [Record(f"{c}/{i}", label) for label, c in enumerate("ab") for i in range(5)]


def test_per_class_takes_first_valid_candidates_and_decodes_each_once():
    bad = {"a/1", "a/3", "b/0"}
    seen = []

    def check(batch):
        seen.extend(r.ref for r in batch)
        return [r.ref not in bad for r in batch]

    rule = parse_subset("per-class:3")
    groups = candidate_groups(RECS, ["a", "b"], rule, seed=0)
    chosen = select_valid(groups, rule, check)
    assert len(seen) == len(set(seen))  # nothing decoded twice
    for g in groups:  # the first 3 valid candidates in seeded order, nothing after them
        valid = [r for r in g.candidates if r.ref not in bad][:3]
        assert [r for r in chosen if r.label == g.candidates[0].label] == sorted(
            valid, key=lambda r: r.ref)
        last = g.candidates.index(valid[-1])
        assert {r.ref for r in g.candidates[last + 1:]}.isdisjoint(seen)
    with pytest.raises(SubsetError, match="class 'a' has only 3 valid images"):
        rule4 = parse_subset("per-class:4")
        select_valid(candidate_groups(RECS, ["a", "b"], rule4, 0), rule4, check)


def test_subset_rules_and_errors():
    assert str(parse_subset("random:7")) == "random:7" and parse_subset(None) is None
    for bad in ("per-class:0", "random", "top:3", "random:-1", "per-class:x"):
        with pytest.raises(SubsetError, match="bad --subset"):
            parse_subset(bad)
    with pytest.raises(SubsetError, match="class 'a' has only 5 images"):
        candidate_groups(RECS, ["a", "b"], parse_subset("per-class:6"), 0)
    rule = parse_subset("random:4")
    picked = select_valid(candidate_groups(RECS, ["a", "b"], rule, 1), rule,
                          lambda b: [True] * len(b))
    assert len(picked) == 4
    with pytest.raises(SourceError, match="class 'b' has no valid images"):
        select_valid(candidate_groups(RECS, ["a", "b"], None, 0), None,
                     lambda b: [r.label == 0 for r in b])


def test_order_is_seeded_and_mixes():
    a, b = shuffle_order(RECS, 0), shuffle_order(RECS, 0)
    assert a == b and sorted(a, key=lambda r: r.ref) == RECS and a != RECS
    assert shuffle_order(RECS, 1) != a


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape) + arr.tobytes()
    (tmp_path / "p").write_bytes(raw)
    (tmp_path / "g").write_bytes(gzip.compress(raw))
    assert (read_idx(tmp_path / "p") == arr).all() and (read_idx(tmp_path / "g") == arr).all()
    (tmp_path / "t").write_bytes(raw[:-1])
    with pytest.raises(SourceError, match="IDX header says"):
        read_idx(tmp_path / "t")


@pytest.mark.parametrize("shape", [(28, 28), (1, 5), (7, 3)])
def test_png_encoder_lossless_mode_l(shape):
    import io

    from PIL import Image

    from dist_ssl.data.images import encode_png_gray

    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(encode_png_gray(arr.tobytes(), *shape)))
    assert (im.format, im.mode, im.size) == ("PNG", "L", shape[::-1])
    assert (np.asarray(im) == arr).all()
