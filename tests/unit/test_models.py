"""Backbone factory, forward_tokens, pos-embed resampling and load_backbone_state.

Big timm models are only built (at 32 px) and run once on [2, C, 32, 32]; nothing is trained.
Every test runs with sockets disabled, so any weight download attempt fails loudly.
"""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from dist_ssl.models import (
    ModelConfig,
    classifier_names,
    create_backbone,
    feature_dim,
    forward_tokens,
    load_backbone_state,
    resample_pos_embed,
    small_vit_names,
)
from dist_ssl.models.cvt import CVT_NAMES
from dist_ssl.models.names import BACKBONE_ALIASES, OWN_BACKBONES
from dist_ssl.models.t2t_vit import T2T_VIT_NAMES

# alias -> (input size, expected final grid)
BACKBONES = {
    "deit_tiny": (32, (2, 2)),
    "deit_small": (32, (2, 2)),
    "deit_base": (32, (2, 2)),
    "vit_small": (32, (2, 2)),
    "vit_base": (32, (2, 2)),
    "pvt_v2_b0": (32, (1, 1)),
    "pvt_v2_b1": (32, (1, 1)),
    "pvt_v2_b2": (32, (1, 1)),
    "pvt_v2_b3": (32, (1, 1)),
    "swin_tiny": (32, (1, 1)),
    "resnet50": (32, (1, 1)),
    "vit_pico_patch4_28": (28, (7, 7)),
    "vit_nano_patch4_28": (28, (7, 7)),
    "vit_nano_patch4_32": (32, (8, 8)),
}


# one torch thread and no network for every test here (fixtures in tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread", "no_network")


def pico(**overrides) -> nn.Module:
    return create_backbone(ModelConfig(name="vit_pico", **overrides)).eval()


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_and_gives_features_and_grid(name, in_chans):
    size, grid = BACKBONES[name]
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name=name, img_size=size, in_chans=in_chans)).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        out = forward_tokens(model, x)
        pooled = model(x)
    dim = feature_dim(model)
    assert pooled.shape == (2, dim)
    assert out.grid == grid
    assert out.tokens.shape == (2, grid[0] * grid[1], dim)
    torch.testing.assert_close(out.pooled, pooled)  # headless forward == pre-logits pooling
    assert torch.isfinite(out.tokens).all()


def test_overrides_take_effect():
    model = pico(patch_size=7, img_size=56, in_chans=1, drop_path=0.2, global_pool="avg")
    assert model.patch_embed.proj.kernel_size == (7, 7)
    assert model.patch_embed.proj.weight.shape[1] == 1
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 96)
    assert model.global_pool == "avg"
    # timm's stochastic depth grows linearly over blocks: 0 (Identity) at the first, rate at the last
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    out = forward_tokens(model, torch.randn(2, 1, 56, 56))
    assert out.grid == (8, 8) and out.tokens.shape == (2, 64, 96)


def test_dynamic_img_size_and_classifier_head():
    model = pico(dynamic_img_size=True, num_classes=10)
    out = forward_tokens(model, torch.randn(2, 3, 36, 36))
    assert out.grid == (9, 9) and out.tokens.shape == (2, 81, 96)
    assert out.pooled.shape == (2, 96)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_size_agnostic_models_ignore_img_size_but_reject_patch_size():
    assert create_backbone(ModelConfig(name="resnet18", img_size=28)).num_features == 512
    with pytest.raises(ValueError, match="patch_size"):
        create_backbone(ModelConfig(name="resnet18", patch_size=8))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^name: unknown backbone 'deit_tinny'; did you mean deit_tiny"):
        ModelConfig(name="deit_tinny").validate()
    with pytest.raises(ValueError, match="^drop_path:"):
        ModelConfig(drop_path=1.5).validate()
    with pytest.raises(ValueError, match="^img_size:"):
        ModelConfig(img_size=0).validate()
    for f in dataclasses.fields(ModelConfig):  # the run-config convention: every field documented
        assert f.metadata.get("help"), f.name
    ModelConfig().validate()


def test_backbone_table_names_every_model_this_package_registers():
    """names.py writes them out (so a config validates without timm): it must not drift from
    what small_vit.py, t2t_vit.py and cvt.py register."""
    registered = (*small_vit_names(), *T2T_VIT_NAMES, *CVT_NAMES)
    assert OWN_BACKBONES == registered
    assert all(timm.is_model(name) and BACKBONE_ALIASES[name] == name for name in registered)


def test_classifier_names():
    assert classifier_names(pico()) == ("head",)
    assert classifier_names(create_backbone(ModelConfig(name="resnet18"))) == ("fc",)
    assert classifier_names(create_backbone(ModelConfig(name="swin_tiny", img_size=32))) == ("head.fc",)


# --- pos-embed resampling -------------------------------------------------------------


def test_resample_keeps_constant_and_prefix():
    pe = torch.cat([torch.randn(1, 1, 4), torch.full((1, 49, 4), 0.7)], dim=1)
    for grid in [(14, 14), (4, 4), (7, 10)]:  # up, down (antialiased), anisotropic
        out = resample_pos_embed(pe, grid, num_prefix_tokens=1)
        assert out.shape == (1, 1 + grid[0] * grid[1], 4)
        torch.testing.assert_close(out[:, :1], pe[:, :1])
        torch.testing.assert_close(out[:, 1:], torch.full_like(out[:, 1:], 0.7))


def test_resample_keeps_linear_away_from_borders():
    i, j = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    plane = torch.stack([2.0 * i - 3.0 * j + 1.0, 0.5 * i], dim=-1)  # [7, 7, 2]
    out = resample_pos_embed(plane.reshape(1, 49, 2), (14, 14), num_prefix_tokens=0).reshape(14, 14, 2)
    # 7 -> 14 halves the step; bicubic taps stay inside the grid for output rows/cols 3..10
    inner = out[3:11, 3:11]
    step_i, step_j = inner[1:] - inner[:-1], inner[:, 1:] - inner[:, :-1]
    close = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(step_i[..., 0], torch.full((7, 8), 1.0), **close)
    torch.testing.assert_close(step_j[..., 0], torch.full((8, 7), -1.5), **close)
    torch.testing.assert_close(step_j[..., 1], torch.zeros(8, 7), **close)


def test_load_28px_backbone_into_56px_model():
    torch.manual_seed(0)
    src = pico()
    dst = pico(img_size=56)
    report = load_backbone_state(dst, src.state_dict())
    assert dst.pos_embed.shape == (1, 1 + 14 * 14, 96)
    assert report.resampled == {"pos_embed": ((1, 50, 96), (1, 197, 96))}
    assert report.missing == [] and report.unexpected == []
    expected = resample_pos_embed(src.pos_embed.detach(), (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # cls position copied
    torch.testing.assert_close(dst.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert forward_tokens(dst, torch.randn(2, 3, 56, 56)).grid == (14, 14)


def test_constant_pos_embed_stays_constant_through_load():
    src = pico()
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.25
    dst = pico(img_size=56)
    load_backbone_state(dst, src.state_dict())
    torch.testing.assert_close(dst.pos_embed[:, 1:].detach(), torch.full((1, 196, 96), 0.25))


def test_head_is_dropped_and_reinitialised_in_place():
    torch.manual_seed(0)
    src = pico(num_classes=10)
    with torch.no_grad():
        src.head.weight.fill_(3.0)
    dst = pico(num_classes=10)
    weight = dst.head.weight
    report = load_backbone_state(dst, src.state_dict())
    assert report.head_dropped == ["head.weight", "head.bias"]
    assert report.head_reinitialized == ["head"]
    assert dst.head.weight is weight  # same Parameter: optimizers built earlier stay valid
    assert dst.head.weight.abs().max() < 1.0  # fresh init, not the checkpoint's 3.0
    torch.testing.assert_close(dst.blocks[0].norm1.weight, src.blocks[0].norm1.weight)
    load_backbone_state(dst, src.state_dict(), keep_head=True)
    torch.testing.assert_close(dst.head.weight, src.head.weight)


def test_resnet_fc_dropped_and_headless_target_accepts_headed_checkpoint():
    src = create_backbone(ModelConfig(name="resnet18", num_classes=10))
    dst = create_backbone(ModelConfig(name="resnet18", num_classes=0))
    report = load_backbone_state(dst, src.state_dict())
    assert report.head_dropped == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)


def test_shape_mismatch_error_is_one_clear_line():
    src = pico(extra={"mlp_ratio": 2.0})
    with pytest.raises(ValueError) as err:
        load_backbone_state(pico(), src.state_dict())
    msg = str(err.value)
    assert "\n" not in msg
    assert "blocks.0.mlp.fc1.weight: checkpoint (192, 96) vs model (384, 96)" in msg


def test_missing_and_unexpected_keys():
    shallow = pico(extra={"depth": 3}).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.3\."):
        load_backbone_state(pico(), shallow)
    report = load_backbone_state(pico(), shallow, strict_backbone=False)
    assert report.missing and all(k.startswith("blocks.3.") for k in report.missing)
    extra = {**pico().state_dict(), "decoder.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.weight'\]"):
        load_backbone_state(pico(), extra)


def test_wrapper_prefixes_are_stripped():
    src = pico()
    wrapped = {}
    for k, v in src.state_dict().items():
        head, _, rest = k.partition(".")
        inner = f"{head}._fsdp_wrapped_module.{rest}" if rest else k
        wrapped[f"module._orig_mod.{inner}"] = v
    dst = pico()
    load_backbone_state(dst, wrapped)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
