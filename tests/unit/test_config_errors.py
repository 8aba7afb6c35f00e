"""Config mistakes that used to pass silently or end in a traceback: one line, exit 2.

Through ``dist_ssl.engine.cli_train.main`` (what tools/train.py runs) in this process: duplicate
recipe keys, override values with ' #', non-finite floats, reversed (lo, hi) ranges of every
registered method, ``data.train=null``, and ``method.init_from`` files that are not safetensors
or do not fit the model.
"""
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from dist_ssl.config import ConfigError, load_config
from dist_ssl.config.overrides import parse_override
from dist_ssl.config.registry import load_builtin_sections, variants
from dist_ssl.engine.cli_train import main
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.base import MethodConfig
from dist_ssl.models import ModelConfig, create_backbone, export_backbone

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "supervised_fmnist2k.yaml"
REQUIRED = ["output_dir=/tmp/run", "train.epochs=2"]


def one_line_error(capsys, argv) -> str:
    """Run the training entry point; assert exit 2 and one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train.py: error: "), err
    return err[len("train.py: error: "):]


def test_duplicate_recipe_key_names_it(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /o\ntrain:\n  epochs: 5\nseed: 1\ntrain:\n  batch_size: 8\n")
    err = one_line_error(capsys, [str(recipe)])
    assert err.startswith(f"train: given twice in {recipe} (lines 2 and 5); YAML would keep only")
    recipe.write_text("output_dir: /o\ntrain: {epochs: 5, batch_size: 8, epochs: 6}\n")
    with pytest.raises(ConfigError, match=r"^train\.epochs: given twice .*\(lines 2 and 2\)"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="gives x twice"):
        parse_override("method.table={x: 1, x: 2}")


def test_override_value_with_hash_is_kept_whole():
    cfg = load_config(None, ["output_dir=/runs/exp #3", "train.epochs=2", "data.train=#shards"])
    assert (cfg.output_dir, cfg.data.train) == ("/runs/exp #3", "#shards")
    assert parse_override("a='quoted #1'") == (["a"], "quoted #1")  # YAML quoting still works
    assert parse_override("a=x#y") == (["a"], "x#y")
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got '5 # five'"):
        load_config(None, ["output_dir=/o", "train.epochs=5 # five"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_floats_are_errors(capsys, value):
    err = one_line_error(capsys, [str(RECIPE), f"optim.base_lr={value}"])
    assert err.startswith("optim.base_lr: must be a finite number, got ")
    with pytest.raises(ConfigError, match="train.ema_decay: must be a finite number"):
        load_config(None, REQUIRED + [f"train.ema_decay={value}"])  # an Optional[float] too


def _range_fields():
    load_builtin_sections()
    for name, cls in sorted(variants(MethodConfig).items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] == tuple[float, float]:
                yield name, f


RANGES = list(_range_fields())


def test_every_method_range_field_declares_its_interval():
    assert len(RANGES) >= 10  # crop scales of idmm, dino, simclr, moco, mae, beit, supervised...
    assert [(n, f.name) for n, f in RANGES if "interval" not in f.metadata] == []


@pytest.mark.parametrize("method, field", RANGES, ids=[f"{n}.{f.name}" for n, f in RANGES])
def test_reversed_range_of_any_method_is_a_config_error(method, field):
    lo, hi = field.default
    with pytest.raises(ConfigError, match=rf"^method\.{field.name}: must be a range \[lo, hi\] with "
                                          rf"0 < lo <= hi <= 1, got \[{hi}, {lo}\] \(reversed\?\)$"):
        load_config(None, REQUIRED + [f"method.name={method}", f"method.{field.name}=[{hi}, {lo}]"])


def test_reversed_crop_scale_through_the_entry_point(capsys):
    err = one_line_error(capsys, [str(RECIPE), "method.crop_scale=[1.0, 0.35]"])
    assert err.startswith("method.crop_scale: must be a range [lo, hi]")


def test_data_train_null_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, [str(RECIPE), f"output_dir={tmp_path / 'run'}", "data.train=null"])
    assert err.startswith("data.train: required to train: a shard directory")


@pytest.fixture(scope="module")
def tiny_shards(fmnist_dir, tmp_path_factory):
    from dist_ssl.data.shard_writer import write_dataset

    out = tmp_path_factory.mktemp("cfgerr") / "shards"
    write_dataset(f"idx:{fmnist_dir}", out, subset="per-class:2", samples_per_shard=20)
    return out


def _build_supervised(init_from, in_chans=1):
    cfg = load_config(RECIPE, [f"method.init_from={init_from}", f"model.in_chans={in_chans}"])
    ctx = MethodContext(model=cfg.model, num_samples=20, num_classes=10, in_chans=in_chans)
    return build_method(cfg.method, ctx)


@pytest.mark.parametrize("kind", ["pth", "random_bytes", "in_chans", "width"])
def test_init_from_that_does_not_fit_names_the_problem(tmp_path, kind):
    path = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    if kind == "pth":
        path = tmp_path / "model.pth"
        torch.save(create_backbone(ModelConfig(name="vit_pico_patch4_28", in_chans=1)).state_dict(), path)
    elif kind == "random_bytes":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        other = {"in_chans": dict(in_chans=3), "width": dict(in_chans=1, name="vit_nano_patch4_28")}[kind]
        export_backbone(create_backbone(ModelConfig(**{"name": "vit_pico_patch4_28", **other})), path)
    with pytest.raises(ConfigError) as err:
        _build_supervised(path)
    msg = str(err.value)
    assert msg.startswith(f"method.init_from: {path} ") and "\n" not in msg
    expected = {"pth": "is not a safetensors backbone file", "random_bytes": "is not a safetensors backbone file",
                "in_chans": "patch_embed.proj.weight: checkpoint (96, 3, 4, 4) vs model (96, 1, 4, 4)",
                "width": "does not fit model.name=vit_pico_patch4_28"}[kind]
    assert expected in msg


def test_init_from_pth_through_the_entry_point(tmp_path, capsys, tiny_shards):
    pth = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    err = one_line_error(capsys, [str(RECIPE), f"output_dir={tmp_path / 'run'}", f"data.train={tiny_shards}",
                                  "data.val=null", f"method.init_from={pth}", "data.num_workers=0"])
    assert err.startswith(f"method.init_from: {pth} is not a safetensors backbone file")
