"""The real training CLI on --resize shards of real photos, with data.decode=cpu and =gpu (the
GPU-decode path on device cpu): both train, and their first losses agree (same views up to
rounding)."""
import math

from conftest import make_photo_folder
from dist_ssl.data.shard_writer import write_dataset

from .conftest import read_log, run_train


def test_resized_photo_shards_train_with_cpu_and_gpu_decode(tmp_path):
    src = make_photo_folder(tmp_path / "photos", classes=2, per_class=24, sizes=(150, 300))
    shards = tmp_path / "shards"
    write_dataset(f"imagefolder:{src}", shards, samples_per_shard=16, resize=64)
    steps = ["train.steps=3", "ckpt.every_steps=100", "train.batch_size=16",
             "model.drop_path=0.0"]
    losses = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        proc = run_train(out, shards, None, *steps, f"data.decode={decode}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_log(out)
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(math.isfinite(r["loss"]) for r in rows)
        losses[decode] = rows[0]["loss"]
    assert abs(losses["cpu"] - losses["gpu"]) < 0.02 * abs(losses["cpu"]), losses
