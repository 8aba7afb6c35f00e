"""Contrastive / self-distillation losses and heads against plain references written here.

Single process (no process group): the global batch is the local batch. The multi-process
equivalence is tests/dist/test_contrastive_dist.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_ssl.heads.dino_head import DINOHead
from dist_ssl.heads.projection import MultiCropWrapper, ProjectionMLP
from dist_ssl.losses.dino import DINOLoss, dino_loss
from dist_ssl.losses.info_nce import global_info_nce, nt_xent, queue_info_nce
from dist_ssl.losses.supcon import supcon_loss


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def ref_nt_xent(z1, z2, t):
    """Chen et al. 2020, Eq. 1, one anchor at a time over the 2N embeddings."""
    z = _unit(torch.cat([z1, z2]))
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[j] / t) / denom)
    return total / (2 * n)


def ref_supcon(views, labels, t, base_t):
    """Khosla et al. 2020, Eq. 2 (L_out), anchor by anchor."""
    n, v = views[0].shape[0], len(views)
    z = _unit(torch.cat(views))                       # view-major: row = view * n + sample
    lab = labels.tolist() * v
    total = 0.0
    for a in range(n * v):
        others = [b for b in range(n * v) if b != a]
        denom = sum(torch.exp(z[a] @ z[b] / t) for b in others)
        pos = [p for p in others if lab[p] == lab[a]]
        total = total - (t / base_t) / len(pos) * sum(torch.log(torch.exp(z[a] @ z[p] / t) / denom) for p in pos)
    return total / (n * v)


def ref_queue_info_nce(q, k, queue, t):
    qs, ks = _unit(q), _unit(k.detach())
    total = 0.0
    for qi, ki in zip(qs, ks):
        logits = torch.cat([(qi @ ki / t)[None], queue @ qi / t])
        total = total - logits[0] + torch.log(torch.exp(logits).sum())
    return total / len(qs)


def ref_dino(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        p = torch.softmax((t.detach() - center) / tt, dim=-1)
        for v, s in enumerate(student):
            if v != i:
                per_image = [-(p[b] * torch.log_softmax(s[b] / ts, dim=-1)).sum() for b in range(len(s))]
                total = total + sum(per_image) / len(s)
                pairs += 1
    return total / pairs


def _grads(fn, *tensors):
    """Value and gradients of fn(*leaves) w.r.t. fresh float64 leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), grads


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_nt_xent_matches_reference_and_invariances():
    z1, z2 = _rand(5, 4, seed=1), _rand(5, 4, seed=2)
    loss = nt_xent(z1, z2, 0.3)
    assert loss.item() == pytest.approx(ref_nt_xent(z1, z2, 0.3).item(), rel=1e-5)
    assert nt_xent(3.0 * z1, 0.5 * z2, 0.3).item() == pytest.approx(loss.item(), rel=1e-5)  # scale
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert nt_xent(z1[perm], z2[perm], 0.3).item() == pytest.approx(loss.item(), rel=1e-5)   # order
    assert nt_xent(z2, z1, 0.3).item() == pytest.approx(loss.item(), rel=1e-5)               # view swap
    # NT-Xent is SupCon with one label per image
    sup = supcon_loss([z1, z2], torch.arange(5), temperature=0.3)
    assert sup.item() == pytest.approx(loss.item(), rel=1e-5)
    # a perfect pair structure gives a lower loss than random embeddings
    assert nt_xent(z1, z1 + 0.01 * z2, 0.3) < loss


def test_supcon_matches_reference_and_invariances():
    views = [_rand(6, 3, seed=3), _rand(6, 3, seed=4)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss = supcon_loss(views, labels, temperature=0.2, base_temperature=0.07)
    assert loss.item() == pytest.approx(ref_supcon(views, labels, 0.2, 0.07).item(), rel=1e-5)
    stacked = supcon_loss(torch.stack(views, 1), labels, temperature=0.2, base_temperature=0.07)
    assert stacked.item() == pytest.approx(loss.item(), rel=1e-6)
    renamed = supcon_loss(views, torch.tensor([7, 3, 7, 9, 3, 7]), temperature=0.2, base_temperature=0.07)
    assert renamed.item() == pytest.approx(loss.item(), rel=1e-6)   # only label equality matters
    scaled = supcon_loss([2 * views[0], 5 * views[1]], labels, temperature=0.2, base_temperature=0.07)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no positive"):
        supcon_loss([views[0]], labels)


def test_queue_info_nce_matches_reference():
    q, k = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    queue = F.normalize(_rand(7, 3, seed=7), dim=1)
    loss = queue_info_nce(q, k, queue, 0.2)
    assert loss.item() == pytest.approx(ref_queue_info_nce(q, k, queue, 0.2).item(), rel=1e-5)
    assert queue_info_nce(4 * q, 0.1 * k, queue, 0.2).item() == pytest.approx(loss.item(), rel=1e-5)
    assert queue_info_nce(q, k, queue[torch.randperm(7)], 0.2).item() == pytest.approx(loss.item(), rel=1e-5)
    assert queue_info_nce(q, k, None, 0.2).item() == pytest.approx(0.0, abs=1e-12)


def test_global_info_nce_is_moco_v3_ctr():
    q, k = _rand(5, 4, seed=8), _rand(5, 4, seed=9)
    loss = global_info_nce(q, k, 0.2)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    ref = sum(-logits[i, i].item() + math.log(sum(math.exp(x) for x in logits[i].tolist())) for i in range(5)) / 5
    assert loss.item() == pytest.approx(ref * 2 * 0.2, rel=1e-5)
    k.requires_grad_(True)
    q.requires_grad_(True)
    global_info_nce(q, k, 0.2).backward()
    assert k.grad is None and q.grad.abs().sum() > 0  # keys carry no gradient


def test_dino_loss_matches_reference_invariances_and_fp16():
    student = [_rand(3, 6, seed=s) for s in (10, 11, 12, 13)]
    teacher = [_rand(3, 6, seed=s) for s in (14, 15)]
    center = _rand(1, 6, seed=16)
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    assert loss.item() == pytest.approx(ref_dino(student, teacher, center, 0.1, 0.04).item(), rel=1e-5)
    shifted = dino_loss([s + 3.0 for s in student], [t - 2.0 for t in teacher], center, 0.1, 0.04)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-5)    # softmax shift invariance
    big = [(s * 2000).half() for s in student]                       # exp overflows in fp16
    out = dino_loss(big, [(t * 2000).half() for t in teacher], center.float(), 0.1, 0.04)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("which", ["nt_xent", "supcon", "queue_info_nce", "global_info_nce", "dino"])
def test_gradients_match_autograd_through_the_reference(which):
    """Every embedding gets the gradient of all the roles it plays (anchor, positive, negative)."""
    a, b = _rand(5, 4, seed=20), _rand(5, 4, seed=21)
    labels = torch.tensor([0, 1, 0, 2, 1])
    queue = F.normalize(_rand(6, 4, seed=22), dim=1)
    t = 0.25
    pairs = {
        "nt_xent": (lambda x, y: nt_xent(x, y, t), lambda x, y: ref_nt_xent(x, y, t)),
        "supcon": (lambda x, y: supcon_loss([x, y], labels, t, 0.1), lambda x, y: ref_supcon([x, y], labels, t, 0.1)),
        "queue_info_nce": (lambda x, y: queue_info_nce(x, y, queue, t),
                           lambda x, y: ref_queue_info_nce(x, y, queue, t)),
        "global_info_nce": (lambda x, y: global_info_nce(x, y, t),
                            lambda x, y: 2 * t * F.cross_entropy(_unit(x) @ _unit(y.detach()).T / t, torch.arange(5))),
        "dino": (lambda x, y: dino_loss([x, y, x * y], [y], x[:1].detach() * 0.3, 0.1, 0.05),
                 lambda x, y: ref_dino([x, y, x * y], [y], x[:1].detach() * 0.3, 0.1, 0.05)),
    }
    ours, ref = pairs[which]
    value, grads = _grads(ours, a, b)
    ref_value, ref_grads = _grads(ref, a, b)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    for g, rg in zip(grads, ref_grads):
        if rg is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)


def test_dino_center_update_is_ema_of_teacher_mean():
    crit = DINOLoss(4, center_momentum=0.9)
    teacher = _rand(6, 4, seed=17).float()
    crit.update_center(teacher.sum(0), teacher.shape[0])
    torch.testing.assert_close(crit.center, 0.1 * teacher.mean(0, keepdim=True))
    crit.update_center(2 * teacher.sum(0), teacher.shape[0])
    mean = teacher.mean(0, keepdim=True)
    torch.testing.assert_close(crit.center, 0.9 * 0.1 * mean + 0.1 * 2 * mean)
    assert "center" in crit.state_dict()


def test_dino_head_weight_norm_and_last_layer_freeze():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4, num_layers=3)
    x = torch.randn(3, 8)
    assert head(x).shape == (3, 5)
    w = head.last_layer_weight()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(5))
    assert head.last_g is None  # g fixed to 1: no parameter
    assert sum(p.numel() for p in head.parameters()) == (8 * 16 + 16) + (16 * 16 + 16) + (16 * 4 + 4) + 5 * 4
    head.freeze_last_layer = True
    frozen = head(x)
    frozen.square().sum().backward()
    assert torch.count_nonzero(head.last_v.grad) == 0 and head.mlp[0].weight.grad.abs().sum() > 0
    head.zero_grad()
    head.freeze_last_layer = False
    torch.testing.assert_close(head(x), frozen)                   # same value, frozen or not
    head(x).square().sum().backward()
    assert head.last_v.grad.abs().sum() > 0
    free_g = DINOHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert free_g.last_g.shape == (5, 1) and free_g.last_g.requires_grad


class _CountingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 3)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.lin(x.mean(dim=(2, 3)))


def test_multicrop_wrapper_groups_resolutions_and_keeps_view_order():
    torch.manual_seed(0)
    backbone = _CountingBackbone()
    head = ProjectionMLP(3, 8, 4, num_layers=2)
    wrapper = MultiCropWrapper(backbone, head, predictor=ProjectionMLP(4, 8, 4, num_layers=2))
    views = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)]
    out = wrapper(views)
    assert backbone.calls == [(4, 1, 8, 8), (4, 1, 4, 4)] and out.shape == (8, 4)
    one_by_one = torch.cat([wrapper.predictor(head(backbone(v))) for v in views])
    torch.testing.assert_close(out, one_by_one)


def test_projection_mlp_layouts():
    simclr = ProjectionMLP(6, 10, 4, num_layers=2, norm="bn")
    assert [type(m).__name__ for m in simclr] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    mocov3 = ProjectionMLP(6, 10, 4, num_layers=3, norm="bn", last_norm=True)
    assert [type(m).__name__ for m in mocov3][-2:] == ["Linear", "BatchNorm1d"] and not mocov3[-1].affine
    plain = ProjectionMLP(6, 10, 4)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[0].bias is not None
    with pytest.raises(ValueError, match="norm"):
        ProjectionMLP(6, 10, 4, norm="ln")
