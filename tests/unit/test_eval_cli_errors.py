"""tools/eval.py: bad backbone metadata and unusable --device values are one line, exit 2."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_ssl.eval.cli import main
from dist_ssl.models import ModelConfig, create_backbone, export_backbone
from dist_ssl.models.export import read_export_metadata


@pytest.fixture(scope="module")
def shards(fmnist_dir, tmp_path_factory):
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("evalerr") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, subset="per-class:2", samples_per_shard=20)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("evalerr") / "backbone.safetensors"
    return export_backbone(create_backbone(ModelConfig(name="vit_pico_patch4_28", in_chans=1)), path)


def run(capsys, backbone, shards, *extra) -> str:
    code = main(["--backbone", str(backbone), "--train", str(shards), "--test", str(shards),
                 "--workers", "0", "--methods", "knn", "-q", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("eval: error: "), err
    return err[len("eval: error: "):]


@pytest.mark.parametrize("key, value, reason", [
    ("img_size", "abc", "metadata img_size='abc' is not a positive integer"),
    ("img_size", "0x0", "metadata img_size='0x0' is not a positive integer"),
    ("in_chans", "x", "metadata in_chans='x' is not a positive integer"),
    ("architecture", "no_such_vit", "cannot load no_such_vit at 28px: Unknown model"),
])
def test_bad_backbone_metadata(capsys, tmp_path, shards, export, key, value, reason):
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(export), bad, metadata={**read_export_metadata(export), key: value})
    assert run(capsys, bad, shards).startswith(f"{bad}: {reason}")


@pytest.mark.parametrize("device", ["banana", "meta", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_unusable_device(capsys, shards, export, device):
    err = run(capsys, export, shards, "--device", device)
    assert err.startswith(f"--device {device!r}: not a device" if device in ("banana", "meta")
                          else f"--device {device}: ")
