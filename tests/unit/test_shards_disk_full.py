"""A full disk while sharding is one line naming ENOSPC and OUT_DIR (exit 2), and leaves no partial
shard; rerunning the same command after freeing space finishes the dataset.

The disk is a real 256 KiB tmpfs where this process may mount one (root with CAP_SYS_ADMIN, as
on the build machines); elsewhere the shard writer's file writes fail with ENOSPC after 64 KiB
(the same OSError the kernel gives).
"""
import errno
import shutil
import subprocess
import uuid

import pytest

from dist_ssl.data import cli_shards, shard_tar, shard_writer
from dist_ssl.data.manifest import load_manifest

ARGS = ["--subset", "per-class:30", "--samples-per-shard", "100"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(a directory on a nearly full disk, how it is full)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        real_write = shard_tar._HashingWriter.write

        def write(self, data):
            if self._pos + len(data) > 64 * 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, data)
        monkeypatch.setattr(shard_tar._HashingWriter, "write", write)
    yield mnt, "tmpfs" if mounted else "patched"
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_while_sharding_is_one_line_and_resumable(fmnist_dir, small_disk, capsys, monkeypatch):
    mnt, how = small_disk
    out = mnt / "out"
    argv = ["-q", "write", f"idx:{fmnist_dir}", str(out), *ARGS]
    assert cli_shards.main(argv) == 2, how
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("make_shards: error: no space left on device (ENOSPC) writing shard-0000")
    assert f"in OUT_DIR {out}: free space or choose another OUT_DIR" in err
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    # space freed (here: the same files moved to a roomy disk): the same command finishes
    roomy = mnt.parent / "roomy"
    shutil.copytree(out, roomy)
    monkeypatch.undo()
    assert cli_shards.main(["-q", "write", f"idx:{fmnist_dir}", str(roomy), *ARGS]) == 0
    assert load_manifest(roomy).num_samples == 300


def test_enospc_outside_a_shard_is_one_line(fmnist_dir, tmp_path, capsys, monkeypatch):
    def full(out_dir, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "manifest.json"))
    monkeypatch.setattr(shard_writer, "save_manifest", full)
    out = tmp_path / "out"
    assert cli_shards.main(["-q", "write", f"idx:{fmnist_dir}", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"make_shards: error: No space left on device (ENOSPC): {out / 'manifest.json'}; "
                   f"free space in OUT_DIR {out} or choose another, then rerun the same command "
                   f"(finished shards are kept)")
