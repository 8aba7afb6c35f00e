"""CheckpointManager in one process (accelerate without a launcher): exact round trip, pruning,
crash safety and one-line errors for corrupt or incompatible checkpoints."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_ssl.engine.checkpoint import COMPLETE, CRASH_ENV, CheckpointError, CheckpointManager
from dist_ssl.parallel.accelerator import build_accelerator, prepare_model_and_optimizer
from dist_ssl.parallel.config import ParallelConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def acc():
    from accelerate.state import AcceleratorState, GradientState

    accelerator = build_accelerator(ParallelConfig())
    yield accelerator
    AcceleratorState._reset_state(True)  # accelerate keeps process-wide singletons
    GradientState._reset_state()


def make(acc, out_dim: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return prepare_model_and_optimizer(acc, model, opt, sched)


class PerRank:
    """Stands in for model-parallel state the accelerator does not know (parallel/rank_local.py):
    every rank saves its own share."""

    per_rank = True

    def __init__(self, obj):
        self.obj = obj

    def state_dict(self):
        return self.obj.state_dict()

    def load_state_dict(self, state):
        self.obj.load_state_dict(state)


def train(model, opt, sched, acc, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()


def clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_round_trip_restores_model_optimizer_scheduler_and_rng(acc, tmp_path):
    model, opt, sched = make(acc)
    train(model, opt, sched, acc, 3)
    cm = CheckpointManager(tmp_path)
    state = {"epoch": 1, "data_position": 48, "nested": {"seen": [1, 2]}}
    path = cm.save(3, acc, state)
    expected = (clone_state(model.state_dict()), clone_state(opt.state_dict()), sched.state_dict(), draws())

    train(model, opt, sched, acc, 2)  # moves params, Adam moments, lr and every RNG
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert not torch.equal(model[0].weight, expected[0]["0.weight"])

    loaded = cm.load(path, acc)
    assert loaded == {**state, "step": 3}
    assert_same(model.state_dict(), expected[0], "model")
    assert_same(opt.state_dict(), expected[1], "optimizer")
    assert sched.state_dict()["last_epoch"] == expected[2]["last_epoch"] == 3
    assert sched.get_last_lr() == pytest.approx([1e-2 / 4])
    assert draws() == expected[3]  # python, numpy and torch RNG continue where the save left them


def test_keep_last_prunes_oldest_and_stale_temp_dirs(acc, tmp_path):
    model, opt, sched = make(acc)
    cm = CheckpointManager(tmp_path, keep_last=2)
    stale = cm.root / ".tmp_step_00000000_deadbeef"
    stale.mkdir(parents=True)
    for step in (1, 2, 3, 4):
        cm.save(step, acc, {})
    assert [p.name for p in cm.complete()] == ["step_00000003", "step_00000004"]
    assert not stale.exists()
    assert sorted(p.name for p in cm.root.iterdir()) == ["step_00000003", "step_00000004"]

    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for step in (1, 2, 3, 4):
        keep_all.save(step, acc, {})
    assert len(keep_all.complete()) == 4


def test_latest_and_resolve_ignore_incomplete_and_temp_dirs(acc, tmp_path):
    model, opt, sched = make(acc)
    cm = CheckpointManager(tmp_path)
    assert cm.latest() is None and cm.resolve("auto") is None
    good = cm.save(1, acc, {})
    (cm.root / "step_00000005").mkdir()  # newer, but no COMPLETE marker
    tmp = cm.root / ".tmp_step_00000009_abcd1234"
    tmp.mkdir()
    (tmp / COMPLETE).write_text("")  # temp dirs never count, even with a marker inside
    (cm.root / "step_00000007").write_text("a file, not a checkpoint")
    assert cm.latest() == good
    assert cm.resolve("auto") == good
    assert cm.resolve("none") is None
    assert cm.resolve(str(good)) == good
    with pytest.raises(CheckpointError, match="COMPLETE: missing"):
        cm.resolve(str(cm.root / "step_00000005"))
    with pytest.raises(CheckpointError, match="does not exist"):
        cm.resolve(str(tmp_path / "nope"))


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from torch import nn
    from dist_ssl.engine.checkpoint import CheckpointManager
    from dist_ssl.parallel.accelerator import ParallelConfig, build_accelerator, prepare_model_and_optimizer

    out = Path(sys.argv[1])
    acc = build_accelerator(ParallelConfig())
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, _ = prepare_model_and_optimizer(acc, model, opt)

    def step():
        acc.backward(model(torch.randn(4, 8)).pow(2).mean())
        opt.step()
        opt.zero_grad()

    cm = CheckpointManager(out)
    step()
    cm.save(1, acc, {"epoch": 0})
    torch.save(model.state_dict(), out / "expected.pt")
    step()
    os.environ["{crash_env}"] = "1"
    cm.save(2, acc, {"epoch": 0})
    print("save returned: the crash hook did not fire")
    """
).replace("{crash_env}", CRASH_ENV)


def test_crash_mid_save_leaves_previous_checkpoint_loadable(acc, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    cm = CheckpointManager(tmp_path)
    temps = [p for p in cm.root.iterdir() if p.name.startswith(".tmp_step_00000002_")]
    assert temps and (temps[0] / "model.safetensors").is_file()  # it did die mid-save
    assert not cm.path_for(2).exists()
    assert cm.latest() == cm.path_for(1)

    torch.manual_seed(1)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, _ = prepare_model_and_optimizer(acc, model, opt)
    assert cm.load(cm.latest(), acc) == {"epoch": 0, "step": 1}
    assert_same(model.state_dict(), torch.load(tmp_path / "expected.pt", weights_only=True))
    cm.save(3, acc, {})  # the next successful save cleans the crashed temp dir up
    assert not temps[0].exists()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.safetensors"])
def test_truncated_file_raises_one_line_error_naming_it(acc, tmp_path, name):
    model, opt, sched = make(acc)
    train(model, opt, sched, acc, 1)
    cm = CheckpointManager(tmp_path)
    path = cm.save(1, acc, {})
    f = path / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        cm.load(path, acc)
    msg = str(err.value)
    assert str(f) in msg and "\n" not in msg


def test_bad_trainer_state_missing_file_and_missing_marker(acc, tmp_path):
    model, opt, sched = make(acc)
    cm = CheckpointManager(tmp_path)
    path = cm.save(1, acc, {})
    gone = path / "optimizer.pt"
    data = gone.read_bytes()
    gone.unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        cm.load(path, acc)
    gone.write_bytes(data)
    cm.load(path, acc)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json: unreadable"):
        cm.load(path, acc)
    (path / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="COMPLETE: missing"):
        cm.load(path, acc)


def test_shape_mismatch_names_the_file_and_parameter(acc, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    make(acc, out_dim=4)
    path = CheckpointManager(tmp_path).save(1, acc, {})
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    other = build_accelerator(ParallelConfig())
    make(other, out_dim=5)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatch for '2\.(weight|bias)'"):
        CheckpointManager(tmp_path).load(path, other)


def test_per_rank_objects_round_trip(acc, tmp_path):
    make(acc)
    local = nn.Linear(3, 2)  # stands in for a model-parallel shard that must stay out of DDP
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    local(torch.randn(2, 3)).sum().backward()
    local_opt.step()
    cm = CheckpointManager(tmp_path)
    path = cm.save(1, acc, {}, stateful={"fc": PerRank(local), "fc_opt": PerRank(local_opt)})
    assert (path / "fc_00000.pt").is_file() and (path / "fc_opt_00000.pt").is_file()
    expected = clone_state(local.state_dict()), clone_state(local_opt.state_dict())
    with torch.no_grad():
        local.weight.add_(1.0)
    local_opt.state.clear()
    cm.load(path, acc, stateful={"fc": PerRank(local), "fc_opt": PerRank(local_opt)})
    assert_same(local.state_dict(), expected[0])
    assert_same(local_opt.state_dict(), expected[1])
    with pytest.raises(CheckpointError, match="per-rank objects"):
        cm.load(path, acc)


def test_write_failure_raises_and_keeps_previous_checkpoint(acc, tmp_path):
    make(acc)
    cm = CheckpointManager(tmp_path)
    good = cm.save(1, acc, {})

    class Broken:
        per_rank = True

        def state_dict(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="rank 0 could not write its files .*ENOSPC, disk full"):
        cm.save(2, acc, {}, stateful={"shard": Broken()})
    assert cm.latest() == good and not cm.path_for(2).exists()
    assert sorted(p.name for p in cm.root.iterdir()) == [good.name]  # the temp dir is gone


def test_save_rejects_non_json_state_before_writing(acc, tmp_path):
    make(acc)
    cm = CheckpointManager(tmp_path)
    with pytest.raises(TypeError):
        cm.save(1, acc, {"bad": object()})
    assert not cm.root.exists()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_trainer_state_json_layout(acc, tmp_path):
    make(acc)
    path = CheckpointManager(tmp_path).save(12, acc, {"epoch": 2})
    assert path.name == "step_00000012"
    record = json.loads((path / "trainer_state.json").read_text())
    assert record["step"] == 12 and record["state"] == {"epoch": 2}
    assert record["meta"]["backend"] == "single" and record["meta"]["num_processes"] == 1


# ----------------------------------------------------------------- untrusted and corrupt files


class _Exploit:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for any command (``os.system``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def exploit_payload(marker: Path, kind: str) -> bytes:
    if kind == "pickle":  # a raw pickle, as torch.load / pickle.load read legacy files
        return pickle.dumps({"state": _Exploit(marker)}, protocol=2)
    buf = io.BytesIO()  # the zip archive torch.save writes, with the exploit inside its data.pkl
    torch.save({"state": _Exploit(marker), "t": torch.zeros(2)}, buf)
    return buf.getvalue()


def forge(ckpt: Path, rel: str, data: bytes) -> None:
    """Replace ``rel`` by ``data`` and make the manifest agree: whoever can write the directory
    can rewrite trainer_state.json too, so the loaders themselves must be safe."""
    (ckpt / rel).write_bytes(data)
    if rel == "trainer_state.json":
        return
    state = ckpt / "trainer_state.json"
    record = json.loads(state.read_text())
    entry = record["files"].get(rel)
    if isinstance(entry, dict):
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    elif entry is not None:  # a size-only manifest
        record["files"][rel] = len(data)
    state.write_text(json.dumps(record))


class Buffers:
    """Stands in for the method's buffers / the EMA: the same on every rank, saved once."""

    def __init__(self):
        self.center = torch.zeros(4)

    def state_dict(self):
        return {"center": self.center.clone(), "updates": 3}

    def load_state_dict(self, state):
        self.center = state["center"].clone()


def full_checkpoint(acc, root: Path):
    """A checkpoint with every kind of file the engine writes on a plain backend."""
    model, opt, sched = make(acc)
    train(model, opt, sched, acc, 1)
    local = nn.Linear(3, 2)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    local(torch.randn(2, 3)).sum().backward()
    local_opt.step()
    objs = dict(stateful={"fc": PerRank(local), "fc_opt": PerRank(local_opt), "method": Buffers()})
    cm = CheckpointManager(root)
    return cm, cm.save(1, acc, {"epoch": 0}, **objs), objs


@pytest.mark.parametrize("kind", ["pickle", "torch_zip"])
def test_no_checkpoint_file_runs_code_when_resumed(acc, tmp_path, kind):
    cm, path, objs = full_checkpoint(acc, tmp_path / "run")
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert {"model.safetensors", "optimizer.pt", "shared_method.pt", "fc_00000.pt"} <= set(files)
    for rel in files:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(path, case)
        marker = tmp_path / f"pwned_{rel.replace('/', '_')}"
        forge(case, rel, exploit_payload(marker, kind))
        try:
            cm.load(case, acc, **objs)
            outcome = None
        except CheckpointError as exc:
            outcome = str(exc)
        assert not marker.exists(), f"{rel}: loading the checkpoint ran code from it"
        if rel == COMPLETE:  # only its presence matters
            continue
        assert outcome is not None and str(case / rel) in outcome and "\n" not in outcome, (rel, outcome)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "shared_method.pt"])
def test_flipped_byte_is_a_one_line_error_naming_the_file(acc, tmp_path, name):
    cm, path, objs = full_checkpoint(acc, tmp_path)
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the content hash can tell
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        cm.load(path, acc, **objs)
    msg = str(err.value)
    assert msg.startswith(f"{f}: content differs from the checkpoint manifest (sha256 mismatch") and "\n" not in msg


def test_unrestorable_rng_state_is_an_error(acc, tmp_path):
    from safetensors.torch import save_file

    cm, path, objs = full_checkpoint(acc, tmp_path / "run")
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))  # a valid file, but not an RNG state
    forge(path, "rng_state_0.safetensors", other.read_bytes())
    with pytest.raises(CheckpointError, match=r"rng_state_0\.safetensors: cannot restore the random number generators"):
        cm.load(path, acc, **objs)


def test_edited_step_in_the_trainer_state_is_refused(acc, tmp_path):
    make(acc)
    cm = CheckpointManager(tmp_path)
    path = cm.save(4, acc, {})
    state = path / "trainer_state.json"
    record = json.loads(state.read_text())
    for step, why in ((-3, "step -3 is not a non-negative integer"), ("4", "step '4' is not a non-negative integer"),
                      (7, "step 7 does not match the directory name step_00000004")):
        state.write_text(json.dumps({**record, "step": step}))
        with pytest.raises(CheckpointError) as err:
            cm.load(path, acc)
        assert str(err.value).startswith(f"{state}: {why}"), str(err.value)


def test_checkpoint_of_an_older_format_is_a_one_line_error(acc, tmp_path):
    """Format 2 kept rank-local state in three files per rank (local_modules / local_optimizer /
    local_scheduler); format 3 holds it as one object per rank."""
    make(acc)
    cm = CheckpointManager(tmp_path)
    path = cm.save(1, acc, {})
    state = path / "trainer_state.json"
    record = json.loads(state.read_text())
    state.write_text(json.dumps({**record, "meta": {**record["meta"], "format_version": 2}}))
    with pytest.raises(CheckpointError) as err:
        cm.load(path, acc)
    assert str(err.value) == (f"{state}: format_version 2 != 3 (rank-local state in three files per rank, now one "
                              "object per rank); resume=none starts over")


@pytest.fixture
def tiny_disk():
    """(dir, mounted): a 1 MiB tmpfs when this process may mount one (root, as on the build
    machines), else a plain dir (the test then simulates the full disk). Outside pytest's
    basetemp, which another session's cleanup may rename under a live mount."""
    disk = Path(tempfile.mkdtemp(prefix="dist_ssl_tiny_disk_"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    try:
        yield disk, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
        shutil.rmtree(disk)


def test_disk_full_during_save_names_enospc_and_keeps_the_previous(acc, tmp_path, tiny_disk, monkeypatch):
    disk, mounted = tiny_disk
    make(acc)
    cm = CheckpointManager(disk)
    good = cm.save(1, acc, {})
    big = nn.Linear(1024, 1024)  # 4 MiB of weights: more than the disk holds
    if not mounted:  # no tmpfs: every write through a Python file fails like a full disk
        import dist_ssl.engine.checkpoint_io as cio

        real_open = open

        class FullDisk(io.FileIO):
            def write(self, b):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(cio, "open", lambda p, mode="r", *a, **k: FullDisk(p, "wb") if "w" in mode
                            else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(CheckpointError) as err:
        cm.save(2, acc, {}, stateful={"big": PerRank(big)})
    msg = str(err.value)
    assert "no space left on device (ENOSPC, disk full" in msg and "\n" not in msg, msg
    assert msg.endswith("the previous checkpoint is intact")
    assert [p.name for p in cm.root.iterdir()] == [good.name]  # the partial save is gone: space is back
    assert cm.load(good, acc) == {"step": 1}
