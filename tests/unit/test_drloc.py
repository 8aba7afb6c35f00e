"""DRLoc (Liu et al., 2021): targets, pair sampling, grid pooling, the student wrapper, and the
switch on the supervised method."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dist_ssl.methods  # noqa: F401
from dist_ssl.config.schema import from_dict
from dist_ssl.heads.drloc import DRLocStudent, gather_cells, pair_positions, pool_grid
from dist_ssl.losses.drloc import drloc_loss, drloc_targets
from dist_ssl.methods import MethodConfig, MethodContext, build_method
from dist_ssl.models.config import ModelConfig
from dist_ssl.models.factory import create_backbone, forward_tokens


def test_targets_for_hand_computed_pairs():
    pos_a = torch.tensor([[[0, 0], [3, 5], [6, 6], [2, 1]]])
    pos_b = torch.tensor([[[0, 0], [0, 1], [0, 0], [5, 4]]])
    expect = torch.tensor([[[0, 0], [3 / 7, 4 / 7], [6 / 7, 6 / 7], [3 / 7, 3 / 7]]])
    assert torch.allclose(drloc_targets(pos_a, pos_b, (7, 7)), expect)
    # non-square grid (rows 7, cols 5): each axis by its own size
    assert torch.allclose(drloc_targets(pos_a[:, 1:2], pos_b[:, 1:2], (7, 5)), torch.tensor([[[3 / 7, 4 / 5]]]))
    pred = torch.tensor([[[0.1, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 0.0]]])
    ref = (pred - expect).abs().mean()
    assert torch.allclose(drloc_loss(pred, expect), ref)


def test_pair_positions_and_gather():
    u = torch.tensor([[[0.0, 0.999, 0.5, 0.15], [0.9999999, 0.0, 0.0, 0.3]]])
    a, b = pair_positions(u, (7, 7))
    assert a.tolist() == [[[0, 6], [6, 0]]] and b.tolist() == [[[3, 1], [0, 2]]]
    tokens = torch.arange(49.0).view(1, 49, 1).expand(1, 49, 3)  # token value = its flat index
    assert gather_cells(tokens, a, 7)[0, :, 0].tolist() == [6.0, 42.0]
    a, b = pair_positions(torch.rand(4, 100, 4), (3, 5))
    assert a[..., 0].max() == 2 and a[..., 1].max() == 4 and a.min() == 0 and b.min() == 0


def test_pool_grid_14_to_7_is_2x2_averaging():
    tokens = torch.randn(2, 196, 4)
    pooled, size = pool_grid(tokens, (14, 14), 7)
    fmap = tokens.view(2, 14, 14, 4)
    ref = fmap.view(2, 7, 2, 7, 2, 4).mean(dim=(2, 4)).reshape(2, 49, 4)
    assert size == (7, 7) and torch.allclose(pooled, ref, atol=1e-6)
    same, size = pool_grid(tokens[:, :49], (7, 7), 7)
    assert size == (7, 7) and same is not None and torch.equal(same, tokens[:, :49])


@pytest.mark.parametrize("name,size", [("vit_pico_patch4_28", 28), ("resnet10t", 96)])
def test_student_matches_backbone_and_feeds_pair_embeddings(name, size):
    torch.manual_seed(0)
    net = create_backbone(ModelConfig(name=name, img_size=size if "vit" in name else None,
                                      in_chans=1, num_classes=10)).eval()
    student = DRLocStudent(net, grid=7).eval()
    x = torch.randn(2, 1, size, size)
    u = torch.rand(2, 6, 4)
    seen = {}
    student.drloc.net[0].register_forward_hook(lambda m, i, o: seen.update(inp=i[0].clone()))
    with torch.no_grad():
        logits, pred, target = student(x, u)
        assert torch.equal(student(x), net(x)) and torch.allclose(logits, net(x), atol=1e-6)
        out = forward_tokens(net, x)
    assert out.grid == (7, 7) if "vit" in name else out.grid == (3, 3)  # ResNet: last feature map
    a, b = pair_positions(u, out.grid)
    grid = out.tokens.view(2, *out.grid, -1)  # [B, h, w, D], row-major as forward_tokens promises
    ref = torch.stack([torch.stack([torch.cat([grid[n, i, j], grid[n, p, q]])
                                    for (i, j), (p, q) in zip(a[n].tolist(), b[n].tolist())]) for n in range(2)])
    assert torch.allclose(seen["inp"], ref)
    assert pred.shape == (2, 6, 2) and torch.allclose(target, drloc_targets(a, b, out.grid))


def _supervised(drloc: bool):
    torch.manual_seed(0)
    cfg = from_dict(MethodConfig, {"name": "supervised", "drloc": drloc, "drloc_lambda": 0.5,
                                   "drloc_pairs": 16})
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1),
                        num_samples=100, num_classes=10, in_chans=1)
    return build_method(cfg, ctx)


def test_supervised_switch():
    batch = {"views": [torch.randn(4, 1, 28, 28)], "label": torch.tensor([0, 1, 2, 3]),
             "index": torch.tensor([7, 8, 9, 10])}
    plain, with_loc = _supervised(False), _supervised(True)
    assert plain.student is plain.backbone()  # off: the bare timm model, as before
    assert isinstance(with_loc.student, DRLocStudent) and with_loc.backbone() is with_loc.student.backbone
    assert with_loc.backbone().state_dict().keys() == plain.student.state_dict().keys()
    rng = torch.get_rng_state()
    out = with_loc(batch, step=2)
    assert torch.equal(torch.get_rng_state(), rng)  # pairs come from (step, ids), not the global RNG
    logs = out["logs"]
    assert torch.allclose(out["loss"], logs["ce"] + 0.5 * logs["drloc"])
    assert torch.allclose(logs["ce"], F.cross_entropy(plain.student(batch["views"][0]), batch["label"]))
    assert torch.equal(with_loc(batch, step=2)["loss"], out["loss"])
    assert not torch.equal(with_loc(batch, step=3)["loss"], out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in with_loc.student.drloc.parameters())
    assert torch.equal(with_loc.classify(batch["views"][0]), with_loc.backbone()(batch["views"][0]))
