"""Supervised init from an export: the classifier head kept for a continuation (method.init_head).

The IDMM paper's Table 3 continues the 224 px fine-tune for 100 epochs at 448 px; the official
code loads every shape-matching key of the 224 px checkpoint, the classifier included. The plain
reference here is the source model itself: at the same resolution a continuation with the head
must compute exactly the source's logits; at another resolution the head and blocks are the
source's and pos_embed is resampled.
"""
from __future__ import annotations

import pytest
import timm
import torch

from dist_ssl.config.errors import ConfigError
from dist_ssl.engine.trainer import _backbone_state
from dist_ssl.eval.features import load_frozen_backbone
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.supervised import SupervisedConfig
from dist_ssl.models import ModelConfig
from dist_ssl.models.export import (HEAD_FILE, export_backbone, export_head, load_head_file, read_export_metadata,
                                    timm_pretrained_kwargs)

K = 5


def make_sup(num_classes: int = K, img_size: int = 16, seed: int = 0, **overrides):
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=img_size, in_chans=1),
                        num_samples=40, num_classes=num_classes, in_chans=1)
    torch.manual_seed(seed)
    return build_method(SupervisedConfig(**overrides), ctx)


def export_like_the_engine(method, out) -> None:
    """What Trainer._export_backbone writes for a method (rank 0, the student's state dict)."""
    state = {f"module.{k}": v for k, v in method.student.state_dict().items()}  # as DDP names them
    backbone = method.backbone()
    state = _backbone_state(state, method.student, backbone)
    export_backbone(backbone, out / "backbone.safetensors", state_dict=state)
    if method.exports_head:
        export_head(backbone, out / HEAD_FILE, state_dict=state)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 'fine-tuned' 5-class model (head moved away from its init) and its run-dir export."""
    out = tmp_path_factory.mktemp("ft224")
    src = make_sup(seed=1, drloc=True, drloc_grid=2)  # a wrapping student (DRLoc) exports the same way
    with torch.no_grad():
        for p in src.backbone().head.parameters():
            p.add_(torch.randn_like(p))
    export_like_the_engine(src, out)
    return src.backbone().eval(), out


def test_the_engine_writes_a_backbone_only_file_and_the_head_beside_it(source):
    src, out = source
    head = load_head_file(out / HEAD_FILE)
    assert set(head) == {"head.weight", "head.bias"} and head["head.weight"].shape == (K, 96)
    assert torch.equal(head["head.weight"], src.head.weight)
    assert read_export_metadata(out / HEAD_FILE)["num_classes"] == str(K)
    assert read_export_metadata(out / "backbone.safetensors")["num_classes"] == "0"
    # every headless consumer is unchanged: timm (num_classes=0 default of the file) and eval
    model = timm.create_model("vit_pico_patch4_28", img_size=16, **timm_pretrained_kwargs(out / "backbone.safetensors"))
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 96)
    frozen, _ = load_frozen_backbone(out / "backbone.safetensors")
    assert frozen(torch.zeros(2, 1, 16, 16)).shape == (2, 96)
    # and the two files give timm the full classifier
    full = timm.create_model("vit_pico_patch4_28", img_size=16, num_classes=K, **timm_pretrained_kwargs(out / "backbone.safetensors"))
    full.load_state_dict(head, strict=False)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(full.eval()(x), src(x), rtol=0, atol=0)


def test_continuation_with_the_head_computes_the_source_logits(source):
    src, out = source
    cont = make_sup(seed=2, init_from=str(out), init_head=True)
    assert sorted(cont.init_report.head_loaded) == ["head.bias", "head.weight"] and not cont.init_report.head_reinitialized
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cont.student.eval()(x), src(x), rtol=0, atol=0)
    new_head = make_sup(seed=2, init_from=str(out / "backbone.safetensors"))  # the default: a new head
    assert not new_head.init_report.head_loaded and new_head.init_report.head_reinitialized == ["head"]
    assert not torch.equal(new_head.student.head.weight, src.head.weight)
    assert torch.equal(new_head.student.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_continuation_at_twice_the_resolution_keeps_head_and_resamples_pos_embed(source):
    src, out = source
    cont = make_sup(img_size=32, seed=2, init_from=str(out), init_head=True)
    assert cont.init_report.resampled["pos_embed"] == ((1, 1 + 16, 96), (1, 1 + 64, 96))
    for name in ("head.weight", "head.bias", "blocks.3.attn.proj.weight", "cls_token"):
        assert torch.equal(cont.student.get_parameter(name), src.get_parameter(name)), name


def test_head_of_another_class_count_or_no_head_is_a_one_line_error(source, tmp_path):
    _, out = source
    with pytest.raises(ConfigError, match=r"^method.init_head: .* is a 5-class head but data.train has 7 classes") as e:
        make_sup(num_classes=7, init_from=str(out), init_head=True)
    assert "\n" not in str(e.value)
    make_sup(num_classes=7, init_from=str(out))  # without init_head: a new 7-class head, no error
    export_backbone(make_sup().backbone(), tmp_path / "backbone.safetensors")  # a pre-training export
    with pytest.raises(ConfigError, match=f"^method.init_head: no {HEAD_FILE} beside"):
        make_sup(init_from=str(tmp_path), init_head=True)
