"""T2T-ViT (Yuan et al. 2021) and CvT (Wu et al. 2021): parameter counts against the papers,
the layers against explicit references, shapes at 112/224/448 px and at CPU sizes, the
resolution change of fine-tuning, the timm interface and the export -> timm round trip.

The paper-sized models are built once per module and run at batch 1 without gradients.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dist_ssl.heads.drloc import pool_grid
from dist_ssl.models import (ModelConfig, create_backbone, export_backbone, forward_tokens, load_backbone_state,
                             read_export_metadata, timm_pretrained_kwargs)
from dist_ssl.models.cvt import ConvAttention
from dist_ssl.models.t2t_vit import TokenPerformer, sinusoid_table

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")

# name -> (paper params M at 1,000 classes, source)
PAPER_PARAMS = {"t2t_vit_7": 4.3, "t2t_vit_14": 21.5, "cvt_13": 20.0}  # T2T-ViT Table 2; CvT Table 2
PICO = ("t2t_vit_pico", "cvt_pico")


@pytest.fixture(scope="module")
def paper_models() -> dict:
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=1000).eval() for name in PAPER_PARAMS}


def pico(name: str, **kw) -> torch.nn.Module:
    """A CPU variant; ModelConfig fields as such, model-specific kwargs through ``extra``."""
    fields = {k: kw.pop(k) for k in list(kw) if k in ModelConfig.__dataclass_fields__}
    torch.manual_seed(0)
    return create_backbone(ModelConfig(name=name, in_chans=1, extra=kw, **fields)).eval()


# ----------------------------------------------------------------- sizes against the papers


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(paper_models, name):
    model = paper_models[name]
    trainable = sum(p.numel() for p in model.parameters())
    assert abs(trainable / 1e6 - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, trainable
    # the official T2T code keeps the sinusoid table and the performers' random features as frozen
    # parameters, so its counts include them; with them ours agree to 0.3%
    fixed = sum(b.numel() for n, b in model.named_buffers() if n == "pos_embed" or n.endswith(".w"))
    assert (fixed > 0) == name.startswith("t2t")
    assert abs((trainable + fixed) / 1e6 - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.003, trainable + fixed
    assert "pos_embed" not in model.state_dict()  # fixed: regenerated, never saved or resampled


def test_paper_architectures(paper_models):
    t7, t14, cvt = (paper_models[n] for n in ("t2t_vit_7", "t2t_vit_14", "cvt_13"))
    assert [(m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) for m in (t7, t14)] == [(256, 7, 4), (384, 14, 6)]
    assert [m.blocks[0].mlp.fc1.out_features for m in (t7, t14)] == [512, 1152]  # mlp ratio 2 / 3
    assert t14.tokens_to_token.attention1.kqv.in_features == 3 * 7 * 7  # 7x7 soft split of RGB
    assert t14.tokens_to_token.attention2.kqv.in_features == 64 * 3 * 3  # token_dim 64, 3x3 split
    assert t14.blocks[0].attn.qkv.bias is None  # qkv_bias=False as the official T2T-ViT
    stages = cvt.stages
    assert [s.patch_embed.proj.out_channels for s in stages] == [64, 192, 384]
    assert [len(s.blocks) for s in stages] == [1, 2, 10]
    assert [s.blocks[0].attn.num_heads for s in stages] == [1, 3, 6]
    assert [s.patch_embed.proj.kernel_size[0] for s in stages] == [7, 3, 3]
    assert [s.patch_embed.proj.stride[0] for s in stages] == [4, 2, 2]
    assert [s.cls_token is not None for s in stages] == [False, False, True]
    q, k = stages[1].blocks[0].attn.conv_proj_q.conv, stages[1].blocks[0].attn.conv_proj_k.conv
    assert (q.stride, k.stride, k.groups, k.kernel_size) == ((1, 1), (2, 2), 192, (3, 3))  # depthwise 3x3


# ----------------------------------------------------------------- layers against references


def test_sinusoid_table_is_the_official_formula():
    n, d = 50, 16  # official get_sinusoid_encoding: pos / 10000^(2 (j // 2) / d); sin even, cos odd
    ref = [[(math.sin if j % 2 == 0 else math.cos)(p / 10000 ** (2 * (j // 2) / d)) for j in range(d)]
           for p in range(n)]
    torch.testing.assert_close(sinusoid_table(n, d)[0], torch.tensor(ref), atol=1e-6, rtol=0)


def test_token_performer_is_random_feature_kernel_attention_with_value_skip():
    torch.manual_seed(0)
    layer = TokenPerformer(dim=12, in_dim=8, kernel_ratio=0.5, drop=0.0).double().eval()
    w = layer.w  # m = 4 orthogonal random features of norm sqrt(m), stored with the weights
    assert w.shape == (4, 8) and "w" in layer.state_dict() and not w.requires_grad
    torch.testing.assert_close(w @ w.t(), 4 * torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)  # float32 init
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    k, q, v = layer.kqv(layer.norm1(x)).split(8, dim=-1)

    def phi(z):  # positive random features of the softmax kernel, / sqrt(m)
        return torch.exp(z @ w.t() - (z * z).sum(-1, keepdim=True) / 2) / 2

    kernel = phi(q) @ phi(k).transpose(1, 2)  # [B, T, T]: the dense attention the performer linearises
    y = v + layer.proj((kernel @ v) / (kernel.sum(-1, keepdim=True) + 1e-8))  # + the official epsilon
    ref = y + layer.mlp(layer.norm2(y))
    torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-12)


def test_conv_attention_matches_an_explicit_reference():
    torch.manual_seed(0)
    attn = ConvAttention(dim=8, num_heads=2).eval()
    for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):  # non-trivial BN statistics
        proj.bn.running_mean.normal_()
        proj.bn.running_var.uniform_(0.5, 2.0)
        proj.bn.weight.data.normal_()
        proj.bn.bias.data.normal_()
    h, w = 6, 4
    x = torch.randn(2, 1 + h * w, 8)
    cls, fmap = x[:, :1], x[:, 1:].reshape(2, h, w, 8).permute(0, 3, 1, 2)

    def project(p, stride):  # depthwise 3x3 conv + BN on the map; the class token joins unchanged
        y = F.conv2d(fmap, p.conv.weight, stride=stride, padding=1, groups=8)
        y = F.batch_norm(y, p.bn.running_mean, p.bn.running_var, p.bn.weight, p.bn.bias, False, 0.0, p.bn.eps)
        return torch.cat([cls, y.flatten(2).transpose(1, 2)], dim=1)

    q = attn.proj_q(project(attn.conv_proj_q, 1))
    k, v = attn.proj_k(project(attn.conv_proj_k, 2)), attn.proj_v(project(attn.conv_proj_v, 2))
    assert q.shape[1] == 1 + 24 and k.shape[1] == 1 + 3 * 2  # stride-2 keys/values: 4x fewer

    def heads(t):
        return t.reshape(2, -1, 2, 4).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) * 8 ** -0.5  # official: scale of the stage width
    y = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, -1, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (h, w), 1), attn.proj(y))


# ----------------------------------------------------------------- shapes and resolution change


def test_resolution_change_112_224_448_keeps_every_weight_and_the_224_output(paper_models):
    """T2T-ViT-7 pre-trained at 112 px, fine-tuned at 224 and 448 (load_backbone_state, as
    method.init_from does): nothing to resample (the sinusoid table is regenerated per grid),
    every weight carried over, and the way back to 224 gives the 224 model's output exactly."""
    torch.manual_seed(1)
    models = {s: create_backbone(ModelConfig(name="t2t_vit_7", img_size=s)).eval() for s in (112, 224, 448)}
    src = models[112].state_dict()
    for size in (224, 448):
        report = load_backbone_state(models[size], models[size // 2].state_dict())
        assert (report.missing, report.unexpected, report.resampled) == ([], [], {})
        for k, v in src.items():
            assert torch.equal(models[size].state_dict()[k], v), k
    x = torch.randn(1, 3, 224, 224)
    back = create_backbone(ModelConfig(name="t2t_vit_7", img_size=224)).eval()
    load_backbone_state(back, models[448].state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), models[224](x))
        for size, model in models.items():
            side = size // 16
            torch.testing.assert_close(model.pos_embed, sinusoid_table(1 + side * side, 256), rtol=0, atol=0)
            out = forward_tokens(model, torch.randn(1, 3, size, size))
            assert out.grid == (side, side) and out.tokens.shape == (1, side * side, 256)
            assert out.pooled.shape == (1, 256)
        with pytest.raises(ValueError, match="built for 224x224 px"):  # fixed size unless dynamic
            models[224](torch.randn(1, 3, 112, 112))


@pytest.mark.parametrize("size", [112, 224, 448])
def test_cvt_13_any_size_and_the_drloc_grid(paper_models, size):
    model = paper_models["cvt_13"]
    with torch.no_grad():
        out = forward_tokens(model, torch.randn(1, 3, size, size))
        logits = model(torch.randn(1, 3, size, size))
    side = size // 16
    assert out.grid == (side, side) and out.tokens.shape == (1, side * side, 384) and logits.shape == (1, 1000)
    pooled, grid = pool_grid(out.tokens, out.grid, 7)  # DRLoc: 14x14 (224 px) average-pooled to 7x7
    assert grid == (min(side, 7), min(side, 7)) and pooled.shape[1] == grid[0] * grid[1]


def test_t2t_vit_14_at_224(paper_models):
    with torch.no_grad():
        out = forward_tokens(paper_models["t2t_vit_14"], torch.randn(1, 3, 224, 224))
    assert out.grid == (14, 14) and out.tokens.shape == (1, 196, 384) and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("name", PICO)
def test_pico_variants_at_cpu_sizes(name):
    model = pico(name)
    assert model.num_features == 96 and sum(p.numel() for p in model.parameters()) < 0.5e6
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = forward_tokens(model, x)
        assert out.grid == (7, 7) and out.tokens.shape == (2, 49, 96)
        torch.testing.assert_close(out.pooled, model(x))  # headless forward == pre-logits pooling
        dyn = pico(name, dynamic_img_size=True, img_size=16)  # IDMM crops: 16 px global, 8 px local
        for size, side in ((16, 4), (8, 2)):
            assert forward_tokens(dyn, torch.randn(2, 1, size, size)).grid == (side, side)
        assert forward_tokens(dyn, torch.randn(2, 1, 28, 20)).grid == (7, 5)  # non-square input


def test_t2t_transformer_variant_and_drop_rates():
    model = pico("t2t_vit_pico", tokens_type="transformer")
    t2t = model.tokens_to_token
    assert type(t2t.attention1).__name__ == "TokenTransformer" and t2t.attention1.mlp.drop.p == 0.0
    assert pico("t2t_vit_pico").tokens_to_token.attention1.dp.p == 0.1  # official performer dropout
    assert pico("t2t_vit_pico", t2t_drop_rate=0.0).tokens_to_token.attention2.dp.p == 0.0
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 96) and all(p.grad is not None for p in model.parameters())
    cvt = pico("cvt_pico", drop_path=0.2)  # CvT-13's stochastic depth: last stage only
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks] for s in cvt.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0] and rates[2] == pytest.approx([0.0, 0.2])


# ----------------------------------------------------------------- timm interface and export


@pytest.mark.parametrize("name", ["t2t_vit_pico_28", "cvt_pico_28"])
def test_timm_interface(name):
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, num_classes=10).eval()
    assert model.pretrained_cfg["input_size"] == (3, 28, 28) and model.pretrained_cfg["classifier"] == "head"
    assert model.pretrained_cfg["fixed_input_size"] == name.startswith("t2t")
    x = torch.randn(2, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (2, 50, 96) and model.num_prefix_tokens == 1
    assert model.forward_head(feats).shape == (2, 10) and model(x).shape == (2, 10)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and all(n in names for n in model.no_weight_decay())
    model.reset_classifier(0)
    assert model(x).shape == (2, 96) and model.get_classifier().__class__.__name__ == "Identity"
    model.reset_classifier(5, global_pool="avg")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    assert timm.create_model(name).num_classes == 0  # CPU variants: headless by default, like vit_pico
    with pytest.raises(RuntimeError):  # no url: pretrained=True without a file never downloads
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name,img_size", [("t2t_vit_pico", 16), ("t2t_vit_pico", 28), ("cvt_pico", 28),
                                           ("t2t_vit_7", 112)])
def test_export_then_timm_load_gives_the_same_features(name, img_size, tmp_path):
    in_chans = 3 if name == "t2t_vit_7" else 1
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name=name, img_size=img_size, in_chans=in_chans, num_classes=7)).eval()
    path = export_backbone(model, tmp_path / "backbone.safetensors")
    meta = read_export_metadata(path)
    assert meta["img_size"] == f"{img_size}x{img_size}" or name.startswith("cvt")  # CvT: size-agnostic
    loaded = timm.create_model(meta["architecture"], **timm_pretrained_kwargs(path)).eval()
    x = torch.randn(2, in_chans, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.forward_head(model.forward_features(x), pre_logits=True),
                                   rtol=0, atol=0)
    ten = timm.create_model(meta["architecture"], num_classes=10, **timm_pretrained_kwargs(path))
    assert ten(x).shape == (2, 10)  # a fresh head on the loaded backbone
    with_head = export_backbone(model, tmp_path / "head.safetensors", keep_head=True)
    again = timm.create_model(meta["architecture"], **timm_pretrained_kwargs(with_head)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
