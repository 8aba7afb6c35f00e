"""Samples that disagree with the manifest or the shard layout are counted skips, never trained on.

Tiny real shard sets (40 Fashion-MNIST images written by the real writer, 16 per shard), edited
with tarfile: class ids outside [0, C), instance ids outside [0, N) / duplicated / misplaced,
tar members that make_shards never writes (``../../evil.png``), two images in one sample.
N = 40 with batch 8 on one rank is 5 batches and no padding, so an uninterrupted clean epoch
shows every id exactly once.
"""
import hashlib
import io
import json
import logging
import shutil
import tarfile
from collections import Counter

import pytest
import torch

from dist_ssl.data.errors import ShardError
from dist_ssl.data.loader import build_eval_loader, build_train_loader
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.views import CropGroup, ViewSpec

N = 40
SPEC = ViewSpec([CropGroup(1, 8)], policy="supervised", in_chans=1)


@pytest.fixture(scope="module")
def shards(fmnist_dir, tmp_path_factory):
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("checks") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, subset="per-class:4", samples_per_shard=16, seed=0)
    return out


def edited(src, dst, edit):
    """Copy a shard dir; ``edit(shard_name, [(member name, bytes)])`` returns the new members.
    The manifest's sha256 are updated: only the layout checks can tell."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for path, info in zip(sorted(dst.glob("shard-*.tar")), manifest["shards"]):
        with tarfile.open(path) as tf:
            members = [(m.name, tf.extractfile(m).read()) for m in tf]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in edit(path.name, members):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tf.addfile(member, io.BytesIO(data))
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def replace_member(name, data):
    """An ``edit`` that swaps one member's bytes."""
    return lambda shard, members: [(n, data if n == name else d) for n, d in members]


def epoch_ids(shard_dir, rank=0, world=1, batch=8):
    loader = build_train_loader(shard_dir, SPEC, batch, rank=rank, world_size=world,
                                num_workers=0, seed=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) and all(b["index"].numel() == batch for b in batches)
    return torch.cat([b["index"] for b in batches]).tolist(), torch.cat([b["label"] for b in batches])


def test_clean_epoch_sees_every_id_once(shards):
    ids, labels = epoch_ids(shards)
    assert Counter(ids) == Counter(range(N)) and 0 <= labels.min() and labels.max() < 10


@pytest.mark.parametrize("member, value, reason", [
    ("000000005.cls", b"10", "class id 10 outside [0, 10)"),
    ("000000005.cls", b"-1", "class id -1 outside [0, 10)"),
    ("000000005.idx", b"999999", "instance id 999999 outside [0, 40)"),
    ("000000005.idx", b"-1", "instance id -1 outside [0, 40)"),
    ("000000005.idx", b"6", "instance id 6 where the shard layout has id 5"),  # a duplicate
    ("000000005.cls", b"one", ".cls is not an integer"),
])
def test_bad_ids_and_labels_are_counted_skips(shards, tmp_path, caplog, member, value, reason):
    bad = edited(shards, tmp_path / "bad", replace_member(member, value))
    with caplog.at_level(logging.WARNING, logger="dist_ssl.data.loader"):
        ids, labels = epoch_ids(bad)
    assert set(ids) == set(range(N)) - {5}  # replaced by another sample of its batch
    assert labels.min() >= 0 and labels.max() < 10
    assert f"corrupt sample skipped: sample 000000005: {reason}" in caplog.text


def duplicate_3_at_7(shard, members):
    """Sample 7 becomes a second copy of sample 3 (key, ids and image)."""
    three = {n[10:]: d for n, d in members if n.startswith("000000003.")}
    return [(f"000000003.{n[10:]}", three[n[10:]]) if n.startswith("000000007.") else (n, d)
            for n, d in members]


def test_duplicate_sample_is_skipped_and_equal_batches_kept_on_two_ranks(shards, tmp_path):
    bad = edited(shards, tmp_path / "dup", duplicate_3_at_7)
    seen = []
    for rank in range(2):
        ids, _ = epoch_ids(bad, rank=rank, world=2, batch=4)  # 5 full batches on each rank
        seen += ids
    assert set(seen) == set(range(N)) - {7} and Counter(seen)[3] == 1  # (seed 0: 3 is not a filler)
    with pytest.raises(ShardError, match="idx 3 occurs twice"):
        verify_dataset(bad)


def test_evil_member_names_are_rejected_without_losing_neighbours(shards, tmp_path, caplog):
    png = None

    def insert(shard, members):
        nonlocal png
        png = png or dict(members)["000000004.png"]
        out = []
        for n, d in members:
            out.append((n, d))
            if n == "000000004.png":  # between two samples: a full evil sample
                out += [("../../evil.cls", b"0"), ("../../evil.idx", b"4"), ("../../evil.png", png)]
            if n == "000000009.cls":  # inside a sample
                out += [("/abs/000000009.png", png), ("x/000000009.idx", b"9")]
            if n == "000000020.idx":
                out.append(("000000020.PNG", png))  # not a lower-case extension make_shards writes
        return out
    bad = edited(shards, tmp_path / "evil", insert)
    with caplog.at_level(logging.WARNING, logger="dist_ssl.data.loader"):
        ids, _ = epoch_ids(bad)
    assert Counter(ids) == Counter(range(N))  # nothing lost, nothing extra
    assert caplog.text.count("rejected (not a <id>.<ext> name") == 6
    assert "'../../evil.png'" in caplog.text
    with pytest.raises(ShardError, match="'../../evil.cls' is not named <id>.<ext>"):
        verify_dataset(bad)


def test_two_images_in_one_sample_is_corrupt(shards, tmp_path, caplog):
    def twice(shard, members):
        return [m for n, d in members for m in ([(n, d), (n, d)] if n == "000000012.png" else [(n, d)])]
    bad = edited(shards, tmp_path / "twice", twice)
    with caplog.at_level(logging.WARNING, logger="dist_ssl.data.loader"):
        ids, _ = epoch_ids(bad)
    assert set(ids) == set(range(N)) - {12}
    assert "sample 000000012: two .png members" in caplog.text


def test_eval_loader_drops_bad_samples(shards, tmp_path):
    bad = edited(shards, tmp_path / "bad", replace_member("000000017.cls", b"10"))
    ids = torch.cat([b["index"] for b in build_eval_loader(bad, 8, 8, in_chans=1, num_workers=0)])
    assert sorted(ids.tolist()) == sorted(set(range(N)) - {17})


def test_misplaced_ids_are_skipped_and_named_by_verify(shards, tmp_path):
    def swap_1_2(shard, members):  # valid samples, but sample 2 is stored before sample 1
        order = {1: 2, 2: 1}
        return sorted(members, key=lambda m: (order.get(int(m[0][:9]), int(m[0][:9])), m[0]))
    swapped = edited(shards, tmp_path / "swap", swap_1_2)
    ids, _ = epoch_ids(swapped)
    assert set(ids) == set(range(N)) - {1, 2}
    with pytest.raises(ShardError, match="sample 1 has idx 2, the layout needs 1"):
        verify_dataset(swapped)


@pytest.mark.parametrize("workers", [0, 1])
def test_no_decodable_sample_is_one_line_data_error(shards, tmp_path, workers):
    from dist_ssl.data.errors import DataError

    def garble(shard, members):
        return [(n, b"not an image" if n.endswith(".png") else d) for n, d in members]
    bad = edited(shards, tmp_path / "garbled", garble)
    loader = build_train_loader(bad, SPEC, 8, num_workers=workers, seed=0)
    with pytest.raises(DataError) as err:
        list(loader)  # through a real worker process: torch re-raises what it caught there
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("rank 0: no decodable sample in a whole stream of ")
