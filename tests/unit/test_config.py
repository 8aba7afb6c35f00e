"""Config system: typed build, overrides, key-path errors, variants, round trip."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from dist_ssl.config import ConfigError, from_dict, load_config, save_config, to_dict
from dist_ssl.config.overrides import apply_overrides, parse_override
from dist_ssl.config.registry import register_variant
from dist_ssl.config.run import reload_saved_config
from dist_ssl.config.schema import doc

REQUIRED = ["output_dir=/tmp/run", "train.epochs=2"]


@dataclasses.dataclass
class ToyMethod:
    name: str = doc("alpha", "which toy method")


@register_variant(ToyMethod, "alpha")
@dataclasses.dataclass
class AlphaConfig(ToyMethod):
    temperature: float = doc(0.1, "softmax temperature")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature: must be > 0")


@register_variant(ToyMethod, "beta")
@dataclasses.dataclass
class BetaConfig(ToyMethod):
    crops: tuple[int, ...] = doc((2, 4), "crop counts")
    sizes: list[int] = doc([112, 48], "crop sizes")


@dataclasses.dataclass
class ToyRun:
    method: ToyMethod = dataclasses.field(default_factory=AlphaConfig)
    mode: Literal["a", "b"] = doc("a", "mode")
    maybe: Optional[float] = doc(None, "optional number")
    pair: tuple[float, float] = doc((0.1, 1.0), "a range")
    table: dict[str, int] = doc({}, "named ints")


def test_defaults_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /out\ntrain: {epochs: 5, batch_size: 32}\n")
    cfg = load_config(recipe, ["train.batch_size=8", "data.train=/shards", "seed=3"])
    assert cfg.output_dir == "/out" and cfg.seed == 3
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 8
    assert cfg.data.train == "/shards" and cfg.data.num_workers == 2  # default kept


@pytest.mark.parametrize("overrides, key, text", [
    (["train.batchsize=3"], "train.batchsize", 'did you mean "batch_size"'),
    (["trian.epochs=3"], "trian", 'did you mean "train"'),
    (["train.batch_size=abc"], "train.batch_size", "expected an integer"),
    (["train.batch_size=1.5"], "train.batch_size", "expected an integer"),
    (["data.drop_last=1"], "data.drop_last", "expected true/false"),
    (["optim.schedule=cosin"], "optim.schedule", "must be one of 'cosine'"),
    (["model.name=deit_tinny"], "model.name", "did you mean deit_tiny"),
    (["method.name=supervized"], "method.name", 'did you mean "supervised"'),
    (["method.mixup=-1"], "method.mixup", "must be >= 0"),
    (["train.batch_size=0"], "train.batch_size", "must be >= 1"),
    (["ckpt.keep_last=0"], "ckpt.keep_last", "must be >= 1"),
    (["data=5"], "data", "expected a mapping"),
])
def test_errors_name_the_full_key(overrides, key, text):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + overrides)
    assert info.value.key == key
    assert text in str(info.value) and "\n" not in str(info.value)


def test_required_keys():
    with pytest.raises(ConfigError, match="output_dir: required"):
        load_config(None, ["train.epochs=1"])
    with pytest.raises(ConfigError, match="train.epochs: set train.epochs or train.steps"):
        load_config(None, ["output_dir=/x"])


def test_override_values_are_yaml_scalars_and_lists():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=1e-3") == (["a"], 1e-3)
    assert parse_override("a=text with spaces") == (["a"], "text with spaces")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("a..b=1")
    with pytest.raises(ConfigError, match="cannot set a.b"):
        apply_overrides({"a": 3}, ["a.b=1"])


def test_variants_types_and_validation():
    cfg = from_dict(ToyRun, {"method": {"name": "beta", "crops": [2, 6]}, "pair": [0.2, 0.9]})
    assert isinstance(cfg.method, BetaConfig) and cfg.method.crops == (2, 6)
    assert cfg.pair == (0.2, 0.9) and cfg.method.sizes == [112, 48]
    assert isinstance(from_dict(ToyRun, {}).method, AlphaConfig)
    with pytest.raises(ConfigError, match=r'method.name: unknown ToyMethod .*did you mean "beta"'):
        from_dict(ToyRun, {"method": {"name": "betta"}})
    with pytest.raises(ConfigError, match="method.temperature: unknown key"):
        from_dict(ToyRun, {"method": {"name": "beta", "temperature": 1.0}})
    with pytest.raises(ConfigError, match="method.temperature: must be > 0"):
        from_dict(ToyRun, {"method": {"temperature": -1}})
    with pytest.raises(ConfigError, match=r"pair: expected 2 values"):
        from_dict(ToyRun, {"pair": [1.0]})
    with pytest.raises(ConfigError, match=r"table\[x\]: expected an integer"):
        from_dict(ToyRun, {"table": {"x": "y"}})
    assert from_dict(ToyRun, {"maybe": 3}).maybe == 3.0


def test_switching_variant_by_override_drops_old_keys():
    data = apply_overrides({"method": {"name": "alpha", "temperature": 0.5}}, ["method.name=beta"])
    assert data == {"method": {"name": "beta"}}


def test_base_recipe_inheritance_and_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("output_dir: /o\ntrain: {epochs: 4, batch_size: 16}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain: {batch_size: 8}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (4, 8)
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, REQUIRED + ["data.train=/s", "train.batch_size=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = reload_saved_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["batch_size"] == 7


def test_exponent_floats_without_dot_are_numbers(tmp_path):
    # plain PyYAML reads 5e-4 as a string; recipes are full of such learning rates
    assert parse_override("lr=1e-3") == (["lr"], 1e-3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pair: [5e-4, 1E+2]\n")
    from dist_ssl.config.overrides import load_yaml
    assert from_dict(ToyRun, load_yaml(recipe)).pair == (5e-4, 100.0)


def test_name_override_of_a_plain_section_keeps_its_other_keys(tmp_path):
    # `model` has a `name` field but is not a variant: changing it must not drop img_size
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /o\ntrain: {epochs: 1}\nmodel: {name: vit_nano, img_size: 28}\n"
                      "method: {name: supervised, label_smoothing: 0.1}\n")
    cfg = load_config(recipe, ["model.name=vit_pico"])
    assert (cfg.model.name, cfg.model.img_size) == ("vit_pico", 28)
    cfg = load_config(recipe, ["method.name=supervised"])
    assert cfg.method.label_smoothing == 0.1


@pytest.mark.parametrize("first_import", ["dist_ssl.config", "dist_ssl.methods.idmm"])
def test_resolved_config_text_does_not_depend_on_import_order(first_import):
    """config.yaml (and the experiment runner's fingerprint of it) is the same text in a trainer
    process and in one that imported a method or model module first: sections in a fixed order."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "fmnist" / "finetune.yaml"
    code = (f"import {first_import}\nfrom dist_ssl.config import load_config, config_to_yaml\n"
            f"print(config_to_yaml(load_config({str(recipe)!r})))")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    top = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith((" ", "-"))
           and line.endswith(":")]
    assert top == ["data", "train", "ckpt", "model", "optim", "metrics", "parallel", "method"]


def test_every_field_of_every_section_and_variant_has_a_one_line_doc():
    from dist_ssl.config.registry import sections, variants
    from dist_ssl.config.run import RunBase

    classes = [RunBase, *sections().values()]
    classes += [v for cls in sections().values() for v in variants(cls).values()]
    undocumented = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                    if not f.metadata.get("help") or "\n" in f.metadata["help"]]
    assert len(classes) >= 18 and undocumented == []
