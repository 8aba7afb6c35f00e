"""tools/eval.py: bad backbone metadata and unusable --device values are one line, exit 2."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_ssl.eval.cli_eval import main
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
    ("architecture", "no_such_vit", "cannot load no_such_vit at 28px: unknown architecture"),
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


def test_random_backbone_equals_an_export_of_the_same_seeded_init(capsys, tmp_path, shards):
    """--random ARCH scores the seeded random init itself: the same numbers as exporting that init
    and evaluating the file; without --img-size/--out it is one line."""
    import json

    common = ["--train", str(shards), "--test", str(shards), "--workers", "0", "--methods", "knn", "-q",
              "--img-size", "16", "--seed", "3"]
    assert main(["--random", "vit_pico_patch4_28", "--in-chans", "1", "--out", str(tmp_path / "r.json"),
                 *common]) == 0
    torch.manual_seed(3)
    path = export_backbone(create_backbone(ModelConfig(name="vit_pico_patch4_28", img_size=16, in_chans=1)),
                           tmp_path / "backbone.safetensors")
    assert main(["--backbone", str(path), "--out", str(tmp_path / "e.json"), *common]) == 0
    rand, exported = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "e.json"))
    assert rand["backbone"] == "random:vit_pico_patch4_28"
    assert (rand["knn_top1"], rand["knn_top5"]) == (exported["knn_top1"], exported["knn_top5"])
    capsys.readouterr()
    assert main(["--random", "vit_pico_patch4_28", "--train", str(shards), "--test", str(shards)]) == 2
    assert "--random needs --img-size, --out" in capsys.readouterr().err
