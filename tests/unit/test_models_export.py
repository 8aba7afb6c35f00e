"""Backbone safetensors export: hygiene, and that timm itself loads it with pretrained=True.

timm is driven with ``pretrained_cfg_overlay=dict(file=PATH, ...)``: a local file, sockets are
disabled for every test so a download attempt would fail.
"""
from __future__ import annotations


import pytest
import timm
import torch
from torch import nn

from dist_ssl.models import (
    ModelConfig,
    create_backbone,
    export_backbone,
    export_state_dict,
    load_backbone_file,
    load_backbone_state,
    read_export_metadata,
    resample_pos_embed,
    timm_pretrained_kwargs,
)


# one torch thread and no network for every test here (fixtures in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


@pytest.fixture(scope="module")
def deit_export(tmp_path_factory):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="deit_tiny", img_size=32, num_classes=5)).eval()
    path = export_backbone(model, tmp_path_factory.mktemp("deit") / "deit_tiny.safetensors")
    return model, path


class Wrapper(nn.Module):  # stands in for DDP's `module.` prefix without a process group
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_export_is_clean_contiguous_headless_and_atomic(tmp_path):
    model = create_backbone(ModelConfig(name="vit_pico", num_classes=10))
    path = tmp_path / "sub" / "pico.safetensors"
    export_backbone(Wrapper(model), path)
    export_backbone(Wrapper(model), path)  # overwriting an existing export works
    assert sorted(p.name for p in path.parent.iterdir()) == ["pico.safetensors"]  # no temp left
    sd = load_backbone_file(path)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert sorted(sd) == sorted(expected)
    for k, v in sd.items():
        assert v.is_contiguous() and v.device.type == "cpu"
        torch.testing.assert_close(v, expected[k])
    meta = read_export_metadata(path)
    assert meta["architecture"] == "vit_pico_patch4_28" and meta["num_classes"] == "0"
    assert meta["img_size"] == "28x28" and meta["in_chans"] == "3" and meta["num_features"] == "96"


def test_export_state_dict_handles_shared_storage(tmp_path):
    w = torch.randn(4, 4)
    path = export_state_dict({"a": w, "b": w, "c": w[1:]}, tmp_path / "x.safetensors")
    sd = load_backbone_file(path)
    for key, ref in {"a": w, "b": w, "c": w[1:]}.items():
        torch.testing.assert_close(sd[key], ref)


def test_timm_loads_headless_export_of_standard_model(deit_export):
    model, path = deit_export
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model("deit_tiny_patch16_224", **timm_pretrained_kwargs(path)).eval()
    assert loaded.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.forward_head(model.forward_features(x), pre_logits=True))
    # A new classifier size gets a fresh head over the same features.
    loaded = timm.create_model("deit_tiny_patch16_224", **timm_pretrained_kwargs(path), num_classes=1000)
    assert loaded.head.out_features == 1000
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_features(x), model.forward_features(x))


def test_timm_file_overlay_alone_needs_num_classes(deit_export):
    # Documents timm behaviour the overlay helper works around: with the cfg's num_classes
    # (1000) timm loads strictly and a headless file misses head.*; num_classes=0 fixes it.
    _, path = deit_export
    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model(
            "deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=32
        )
    timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        img_size=32,
        num_classes=0,
    )


def test_timm_loads_small_variant_export_one_channel(tmp_path):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="vit_pico", in_chans=1)).eval()
    path = export_backbone(model, tmp_path / "pico.safetensors")
    loaded = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(path)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # At another resolution timm's own checkpoint filter resamples pos_embed, like ours does.
    bigger = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(path), img_size=56)
    expected = resample_pos_embed(model.pos_embed.detach(), (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(bigger.pos_embed.detach(), expected)


def test_small_variant_pretrained_without_file_raises_instead_of_downloading():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vit_pico_patch4_28", pretrained=True)


def test_export_with_head_round_trips_logits(tmp_path):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="vit_pico", num_classes=10)).eval()
    path = export_backbone(model, tmp_path / "pico_head.safetensors", keep_head=True)
    assert "head.weight" in load_backbone_file(path)
    loaded = timm.create_model("vit_pico_patch4_28", **timm_pretrained_kwargs(path)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_export_loads_into_higher_resolution_model(tmp_path):
    model = create_backbone(ModelConfig(name="vit_pico"))
    path = export_backbone(model, tmp_path / "pico.safetensors")
    target = create_backbone(ModelConfig(name="vit_pico", img_size=56, num_classes=10))
    report = load_backbone_state(target, load_backbone_file(path))
    assert report.resampled["pos_embed"] == ((1, 50, 96), (1, 197, 96))
    assert report.missing == [] and report.head_reinitialized == ["head"]


def test_export_head_alone_from_a_wrapped_model(tmp_path):
    from dist_ssl.models import export_head, load_head_file

    model = create_backbone(ModelConfig(name="resnet18", num_classes=7))  # head named fc, not head
    path = export_head(Wrapper(model), tmp_path / "head.safetensors")
    head = load_head_file(path)
    assert sorted(head) == ["fc.bias", "fc.weight"] and torch.equal(head["fc.weight"], model.fc.weight)
    meta = read_export_metadata(path)
    assert (meta["architecture"], meta["num_classes"], meta["num_features"]) == ("resnet18", "7", "512")
    with pytest.raises(ValueError, match="has no classifier head"):
        export_head(create_backbone(ModelConfig(name="vit_pico")), tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()
