"""make_shards: interrupted runs resume, argument changes are refused, verify finds damage,
worker count does not change the output."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import dist_ssl.data.shard_writer as shard_writer
from dist_ssl.data.errors import OutDirError, ShardError
from dist_ssl.data.manifest import load_manifest
from dist_ssl.data.shard_verify import verify_dataset
from dist_ssl.data.shard_writer import FAIL_AFTER_ENV, write_dataset

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "tools/make_shards.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def stats(out):
    """shard name -> (inode, mtime_ns) to prove a file was not rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}


@pytest.fixture
def small(fmnist_dir):
    """Arguments for a 600-image, 10-shard dataset (fast)."""
    return dict(source=f"idx:{fmnist_dir}", subset="random:600", samples_per_shard=64, seed=5)


@pytest.fixture(scope="module")
def reference(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    write_dataset(f"idx:{fmnist_dir}", out, subset="random:600", samples_per_shard=64, seed=5)
    return out


def test_crash_then_resume_keeps_finished_shards(small, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(out_dir=out, **small)
    assert not (out / "manifest.json").exists()  # incomplete dataset: no manifest
    assert sorted(stats(out)) == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [p.name for p in out.glob("*.tmp")] == ["shard-000003.tar.tmp"]  # partial, ignored
    before = stats(out)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    m = write_dataset(out_dir=out, **small)
    after = stats(out)
    assert all(after[name] == st for name, st in before.items())  # untouched
    assert len(after) == 10 and not list(out.rglob("*.tmp"))
    assert m.to_dict() == load_manifest(reference).to_dict()
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    verify_dataset(out)


def test_cli_crash_exit_nonzero_then_resume(small, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, **{FAIL_AFTER_ENV: "1"})
    args = ["write", small["source"], out, "--subset", small["subset"], "--seed", "5",
            "--samples-per-shard", "64"]
    r = subprocess.run([sys.executable, "tools/make_shards.py", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and not (out / "manifest.json").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resuming: 1 of 10 shards already finished" in r.stderr
    assert run_cli("verify", out).returncode == 0


def test_deleted_shard_and_manifest_rebuilt(small, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "shard-000004.tar").unlink()
    (out / "manifest.json").unlink()
    before = stats(out)
    write_dataset(out_dir=out, **small)
    after = stats(out)
    assert {n for n in after if after[n] != before.get(n)} == {"shard-000004.tar"}
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    # A complete dataset is left alone: same command = no-op.
    write_dataset(out_dir=out, **small)
    assert stats(out) == after


def test_resume_does_not_decode_again(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    for c in "xy":
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / c / f"{i}.png")
    calls = []
    real = shard_writer.probe_path_job
    monkeypatch.setattr(shard_writer, "probe_path_job", lambda p: calls.append(p) or real(p))
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError):
        write_dataset(f"imagefolder:{folder}", tmp_path / "out", samples_per_shard=4)
    assert sorted(calls) == sorted(str(p) for p in folder.rglob("*.png"))  # each once
    calls.clear()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    m = write_dataset(f"imagefolder:{folder}", tmp_path / "out", samples_per_shard=4)
    assert calls == [] and m.num_samples == 12


def test_changed_arguments_refused_unless_overwrite(small, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    r = run_cli("write", small["source"], out, "--subset", small["subset"], "--seed", "6",
                "--samples-per-shard", "64")
    assert r.returncode == 2
    assert "--seed was 5, now 6" in r.stderr and "--overwrite" in r.stderr
    with pytest.raises(OutDirError, match="--samples-per-shard was 64, now 100"):
        write_dataset(out_dir=out, **dict(small, samples_per_shard=100))
    assert load_manifest(out).seed == 5  # nothing was touched
    m = write_dataset(out_dir=out, overwrite=True, **dict(small, seed=6))
    assert m.seed == 6 and verify_dataset(out).seed == 6
    assert len(list(out.glob("shard-*.tar"))) == 10 and not list(out.rglob("*.tmp"))


def test_foreign_nonempty_out_dir_refused(small, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match="not empty"):
        write_dataset(out_dir=tmp_path, **small)
    write_dataset(out_dir=tmp_path, overwrite=True, **small)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only our files are ever deleted


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite(path, edit):
    """Rewrite a shard through ``edit(list of (TarInfo, bytes))``, then fix the manifest sha
    so that only the content checks can catch the damage."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in edit(members):
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    man = path.parent / "manifest.json"
    raw = json.loads(man.read_text())
    for s in raw["shards"]:
        if s["name"] == path.name:
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    man.write_text(json.dumps(raw))


def _set(members, suffix, value, nth=0):
    hits = [i for i, (m, _) in enumerate(members) if m.name.endswith(suffix)]
    i = hits[nth]
    members[i] = (members[i][0], value(members[i][1]))
    return members


TAMPER = {
    "sha256": lambda p: _flip_byte(p, p.stat().st_size // 2),
    "samples, manifest says": lambda p: _rewrite(p, lambda ms: ms[:-3]),
    "has cls 99": lambda p: _rewrite(p, lambda ms: _set(ms, ".cls", lambda _: b"99")),
    "occurs twice": lambda p: _rewrite(p, lambda ms: ms + ms[:3]),
    "does not decode": lambda p: _rewrite(p, lambda ms: _set(ms, ".png", lambda d: d[:60])),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("problem", list(TAMPER))
def test_verify_names_damaged_shard(fmnist2k_shards, tmp_path, problem):
    out = tmp_path / "copy"
    shutil.copytree(fmnist2k_shards, out)
    TAMPER[problem](out / "shard-000003.tar")
    r = run_cli("verify", out)
    assert r.returncode == 1, r.stdout
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("make_shards: error: shard-000003.tar: ")
    assert problem in line
    with pytest.raises(ShardError, match=f"^shard-000003.tar: .*{problem}"):
        verify_dataset(out)


def test_workers_2_byte_identical_to_workers_1(small, reference, tmp_path, fmnist_dir):
    m = write_dataset(out_dir=tmp_path / "w2", workers=2, **small)
    assert m.to_dict() == load_manifest(reference).to_dict()
    for s in m.shards:
        assert (tmp_path / "w2" / s.name).read_bytes() == (reference / s.name).read_bytes()
    assert verify_dataset(tmp_path / "w2", workers=2).num_samples == 600
