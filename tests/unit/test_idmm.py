"""IDMM (dist_ssl.methods.idmm) and its instance-label CutMix (dist_ssl.data.mixing), one process.

The loss is checked against a dense reference written here (full W, plain softmax CE with the
dense soft target q = (1-eps)(lam onehot(a) + (1-lam) onehot(b)) + eps/N); the multi-process
equality lives in tests/dist/test_idmm_dist.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.mixing import cutmix_instances, mix_rng
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.idmm import IDMMConfig
from dist_ssl.models.config import ModelConfig

N, B = 37, 6  # instances (not divisible by 2 or 3), images per batch


def make_ctx(world_size: int = 1, rank: int = 0, num_samples: int = N, dynamic: bool = True) -> MethodContext:
    model = ModelConfig(name="vit_pico_patch4_28", img_size=16, in_chans=1, dynamic_img_size=dynamic)
    return MethodContext(model=model, num_samples=num_samples, num_classes=10, in_chans=1,
                         world_size=world_size, rank=rank)


def make_idmm(world_size: int = 1, rank: int = 0, **overrides):
    cfg = IDMMConfig(**{"global_size": 16, "local_size": 8, "local_crops": 3, "seed": 3, **overrides})
    torch.manual_seed(0)  # the same backbone init for every rank / world size
    return build_method(cfg, make_ctx(world_size, rank))


def make_batch(method, b: int = B, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 1, grp.size, grp.size, generator=g) for grp in method.train_views().view_groups]
    return {"index": torch.randperm(N, generator=g)[:b], "label": torch.zeros(b, dtype=torch.long), "views": views}


# ----------------------------------------------------------------------------- CutMix
def _constant_images(b: int, h: int = 12, w: int = 10) -> torch.Tensor:
    """Row i is filled with the value i: every pixel names the image it came from."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).clone()


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_lam_is_the_kept_pixel_fraction_and_partner_is_in_the_batch(seed):
    b = 9
    x, ids = _constant_images(b), torch.arange(100, 100 + b)
    out = cutmix_instances(x, ids, 0.5, mix_rng(seed))
    assert sorted(out.perm.tolist()) == list(range(b))  # a permutation of the same batch
    assert torch.equal(out.target_a, ids) and torch.equal(out.target_b, ids[out.perm])
    assert torch.equal(x, _constant_images(b))  # input untouched
    assert torch.all(out.lam == out.lam[0])  # one draw for the whole batch
    for i in range(b):
        own = (out.images[i] == i).float().mean().item()
        partner = (out.images[i] == out.perm[i].item()).float().mean().item()
        if out.perm[i] != i:
            assert own == pytest.approx(out.lam[i].item(), abs=1e-7)
            assert partner == pytest.approx(1 - out.lam[i].item(), abs=1e-7)
        top, bottom, left, right = out.box
        assert torch.all(out.images[i, :, top:bottom, left:right] == out.perm[i])


def test_cutmix_draws_follow_the_key_and_beta_distribution():
    x, ids = _constant_images(8), torch.arange(8)
    a, b = cutmix_instances(x, ids, 0.5, mix_rng(1, 0, 5)), cutmix_instances(x, ids, 0.5, mix_rng(1, 0, 5))
    assert torch.equal(a.images, b.images) and torch.equal(a.perm, b.perm) and a.box == b.box
    # plain (unfolded) CutMix, Yun et al. / timm
    lams = [cutmix_instances(x, ids, 0.5, mix_rng(1, 0, s), fold=False).lam[0].item() for s in range(200)]
    raw = [mix_rng(1, 0, s).beta(0.5, 0.5) for s in range(200)]  # the first draw of each key
    assert len(set(lams)) > 20  # a new draw per step
    # Beta(0.5, 0.5) is U-shaped; the box is clipped at the border, so the kept area >= raw lam
    assert sum(v < 0.2 for v in raw) > 30 and sum(v > 0.8 for v in raw) > 30
    assert all(raw_v - 1e-9 <= v <= 1.0 for v, raw_v in zip(lams, raw))
    assert sum(v < 0.5 for v in lams) > 10
    plain = cutmix_instances(x, ids, 0.0, mix_rng(0))
    assert torch.equal(plain.images, x) and torch.all(plain.lam == 1) and torch.equal(plain.target_b, ids)


def official_cutmix_data(x: np.ndarray, y: np.ndarray, alpha: float, rng: np.random.Generator):
    """The official IDMM code's ``utils/mixup_utils.py`` ``cutmix_data`` + ``rand_bbox``, line by
    line in numpy, with ``np.random.*`` / ``torch.randperm`` replaced by draws from ``rng`` in the
    same order. Returns (mixed, y_a, y_b, area-corrected lam, lam before the correction)."""
    lam = rng.beta(alpha, alpha)
    lam = max(lam, 1 - lam)
    index = rng.permutation(x.shape[0])
    W, H = x.shape[2], x.shape[3]  # rand_bbox(size, lam): "W" is size[2], as in the official code
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = rng.integers(W), rng.integers(H)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    mixed = x.copy()
    mixed[:, :, bbx1:bbx2, bby1:bby2] = x[index, :, bbx1:bbx2, bby1:bby2]
    kept = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (x.shape[-1] * x.shape[-2]))
    return mixed, y, y[index], kept, lam


@pytest.mark.parametrize("seed", range(12))
def test_folded_cutmix_equals_the_official_function_on_the_same_generator(seed):
    # non-square images, so a swapped row/column draw or box side would show
    x = torch.randn(7, 2, 12, 9, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(50, 57)
    ours = cutmix_instances(x, ids, 0.5, mix_rng(4, 1, seed), fold=True)
    mixed, y_a, y_b, kept, lam_pre = official_cutmix_data(x.numpy(), ids.numpy(), 0.5, mix_rng(4, 1, seed))
    assert lam_pre >= 0.5  # folded before the box is cut
    assert np.array_equal(ours.images.numpy(), mixed)
    assert np.array_equal(ours.target_a.numpy(), y_a) and np.array_equal(ours.target_b.numpy(), y_b)
    assert ours.lam.tolist() == [pytest.approx(kept, abs=1e-7)] * 7
    assert ours.lam[0].item() >= 0.5  # the pasted patch never covers more than half the image


def test_fold_is_the_idmm_default_and_keeps_the_draw_keys():
    x, ids = _constant_images(8, 16, 16), torch.arange(8)
    folded = [cutmix_instances(x, ids, 0.5, mix_rng(2, 0, s), fold=True) for s in range(200)]
    plain = [cutmix_instances(x, ids, 0.5, mix_rng(2, 0, s), fold=False) for s in range(200)]
    assert min(f.lam[0].item() for f in folded) >= 0.5
    assert sum(p.lam[0].item() < 0.5 for p in plain) > 20
    # the fold consumes no draw: same partners for the same key (resume stays exact)
    assert all(torch.equal(f.perm, p.perm) for f, p in zip(folded, plain))
    assert IDMMConfig().cutmix_fold is True
    m, unfolded = make_idmm(), make_idmm(cutmix_fold=False)
    batch = make_batch(m)
    lam = [g.lam[0].item() for step in range(30) for g in m.mix(batch["views"], batch["index"], step)]
    lam_plain = [g.lam[0].item() for step in range(30) for g in unfolded.mix(batch["views"], batch["index"], step)]
    assert min(lam) >= 0.5 and min(lam_plain) < 0.5


def test_idmm_mixes_each_crop_group_separately():
    m = make_idmm()
    batch = make_batch(m)
    diffs = 0
    for step in range(6):
        groups = m.mix(batch["views"], batch["index"], step)
        assert [len(g.lam) for g in groups] == [2 * B, 3 * B]  # views of a group concatenated
        for g, count in zip(groups, (2, 3)):
            assert torch.equal(g.target_a, batch["index"].repeat(count))
            assert sorted(g.perm.tolist()) == list(range(count * B))  # partners from the same rows
            assert torch.equal(g.target_b, g.target_a[g.perm])
        diffs += groups[0].lam[0].item() != groups[1].lam[0].item() or groups[0].box != groups[1].box
        again = m.mix(batch["views"], batch["index"], step)
        assert all(torch.equal(a.images, b.images) for a, b in zip(groups, again))  # f(seed, rank, step)
    assert diffs == 6
    # groups of equal shape (the official 112/112 setting) still get independent draws
    same = make_idmm(local_size=16, local_crops=2)
    views = [torch.randn(B, 1, 16, 16) for _ in range(4)]
    for step in range(3):
        g0, g1 = same.mix(views, batch["index"], step)
        assert not torch.equal(g0.perm, g1.perm) and (g0.lam[0] != g1.lam[0] or g0.box != g1.box)
    other_rank = m.mix(batch["views"], batch["index"], 0, rank=1)
    assert not torch.equal(other_rank[0].perm, m.mix(batch["views"], batch["index"], 0)[0].perm)


# ----------------------------------------------------------------------------- the method
def test_views_and_ablation_switches():
    m = make_idmm()
    spec = m.train_views()
    assert [(g.count, g.size, g.scale) for g in spec.groups] == [(2, 16, (0.14, 1.0)), (3, 8, (0.05, 0.4))]
    assert spec.policy == "simclr" and spec.in_chans == 1
    cfg = IDMMConfig(global_size=112, multi_crop=False, small_resolution=False)
    assert [(g.count, g.size) for g in cfg.crop_groups()] == [(2, 224)]
    assert [(g.count, g.size) for g in IDMMConfig().crop_groups()] == [(2, 112), (4, 112)]  # official
    with pytest.raises(ValueError, match="label_smoothing"):
        IDMMConfig(label_smoothing=1.0).validate()
    with pytest.raises(ConfigError, match="model.dynamic_img_size"):
        build_method(IDMMConfig(global_size=16, local_size=8), make_ctx(dynamic=False))
    no_mix = make_idmm(cutmix=False, label_smoothing=0.0)
    groups = no_mix.mix(make_batch(no_mix)["views"], make_batch(no_mix)["index"], 0)
    assert all(torch.all(g.lam == 1) for g in groups)


def test_small_resolution_off_alone_doubles_crops_and_backbone():
    """Table 8's 'small res.' switch is one key: with a fixed-size ViT (no dynamic_img_size) at
    model.img_size=16, small_resolution=false alone gives 32 px crops and a 32 px backbone, the
    same as setting crops and model.img_size to 32 by hand."""
    base = dict(global_size=16, local_size=16, local_crops=2, seed=3)
    torch.manual_seed(0)
    small = build_method(IDMMConfig(**base), make_ctx(dynamic=False))
    torch.manual_seed(0)
    large = build_method(IDMMConfig(**base, small_resolution=False), make_ctx(dynamic=False))
    torch.manual_seed(0)
    by_hand = build_method(IDMMConfig(**{**base, "global_size": 32, "local_size": 32}),
                           MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=32, in_chans=1),
                                                         num_samples=N, num_classes=10, in_chans=1))
    assert [(g.count, g.size) for g in small.train_views().groups] == [(2, 16), (2, 16)]
    assert [(g.count, g.size) for g in large.train_views().groups] == [(2, 32), (2, 32)]
    assert small.backbone().patch_embed.img_size == (16, 16)
    assert large.backbone().patch_embed.img_size == (32, 32) and large.ctx.model.img_size == 32
    ref = by_hand.backbone().state_dict()
    assert {k: v.shape for k, v in large.backbone().state_dict().items()} == {k: v.shape for k, v in ref.items()}
    out = large(make_batch(large), step=0)  # the fixed-size backbone accepts the 32 px crops
    assert math.isfinite(out["loss"].item())
    with pytest.raises(AssertionError):  # ... which the 16 px one refuses: the native size moved
        small.student([torch.zeros(2, 1, 32, 32)])


@pytest.mark.parametrize("projection", [False, True])
def test_forward_finite_and_every_parameter_gets_a_gradient(projection):
    m = make_idmm(projection=projection, proj_hidden_dim=32, proj_dim=16, classifier_bias=True)
    out = m(make_batch(m), step=0)
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert set(out["logs"]) == {"ce_global", "ce_local", "lam"}
    # near-uniform predictions at init: each group's CE is about log N
    assert out["logs"]["ce_global"].item() == pytest.approx(math.log(N), abs=0.5)
    out["loss"].backward()
    params = dict(m.named_parameters())
    assert "classifier.weight" in params and "classifier.bias" in params
    assert any(n.startswith("student.head.") for n in params) == projection
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert [id(x) for x in m.local_modules()] == [id(m.classifier)]
    assert m.classify(torch.zeros(1, 1, 16, 16)) is None
    assert m.backbone() is m.student.backbone
    assert m.extra_state_dict() == {}  # everything is student or rank-local


def _dense_soft_ce(logits, a, b, lam, eps):
    q = torch.zeros_like(logits)
    rows = torch.arange(len(a))
    q.index_put_((rows, a), (1 - eps) * lam, accumulate=True)
    q.index_put_((rows, b), (1 - eps) * (1 - lam), accumulate=True)
    q += eps / logits.shape[1]
    return -(q * logits.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("overrides", [{}, {"label_smoothing": 0.0}, {"cutmix": False, "logit_chunk": 5},
                                       {"classifier_bias": True, "logit_chunk": 4}])
def test_world_size_1_loss_equals_dense_reference(overrides):
    m = make_idmm(**overrides)
    with torch.no_grad():
        if m.classifier.bias is not None:
            m.classifier.bias.normal_()
    batch = make_batch(m, seed=4)
    groups = m.mix(batch["views"], batch["index"], step=7)
    if m.cfg.cutmix:
        assert any(torch.any(g.target_a != g.target_b) for g in groups)
    out = m.loss(groups)
    out["loss"].backward()
    got_w = m.classifier.weight.grad.clone()

    w = m.classifier.weight.detach().clone().requires_grad_(True)
    bias = None if m.classifier.bias is None else m.classifier.bias.detach()
    with torch.no_grad():
        feats = m.student([g.images for g in groups])
    ref, start = 0.0, 0
    for g in groups:
        f = feats[start:start + len(g.lam)]
        start += len(g.lam)
        logits = f @ w.t() + (0 if bias is None else bias)
        ref = ref + _dense_soft_ce(logits, g.target_a, g.target_b, g.lam, m.cfg.label_smoothing)
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(got_w, w.grad, atol=1e-6, rtol=1e-5)


def test_hard_labels_reduce_to_cross_entropy():
    m = make_idmm(cutmix=False, label_smoothing=0.0, multi_crop=False)
    batch = make_batch(m, seed=2)
    out = m(batch, step=0)
    with torch.no_grad():
        logits = m.student(batch["views"][:2]) @ m.classifier.weight.t()
    ref = F.cross_entropy(logits, batch["index"].repeat(2))
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)


def test_out_of_range_instance_id_is_a_clear_error():
    m = make_idmm()
    batch = make_batch(m)
    batch["index"][0] = N
    with pytest.raises(ValueError, match="outside \\[0, 37\\)"):
        m(batch, step=0)


# ----------------------------------------------------------------------------- rank-local state
def _rank_local(method, lr=0.1):
    """IDMM's classifier as the engine holds it: with its own AdamW and (constant) schedule."""
    from dist_ssl.parallel.rank_local import RankLocalState

    opt = torch.optim.AdamW([method.classifier.weight], lr=lr, weight_decay=0.05)
    return RankLocalState(method.named_local_modules(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_reshard_from_two_ranks_equals_one_rank_including_adamw_state():
    full = make_idmm()
    shards = [make_idmm(world_size=2, rank=r) for r in range(2)]
    assert [s.classifier.n_local for s in shards] == [19, 18]
    torch.testing.assert_close(torch.cat([s.classifier.weight for s in shards]), full.classifier.weight)
    grad = torch.randn(N, full.classifier.dim)

    def adamw_step(method, rows):
        state = _rank_local(method)
        method.classifier.weight.grad = grad[rows].clone()
        state.step()
        return state

    ref = adamw_step(full, slice(None))
    saved = [adamw_step(s, slice(s.classifier.shard_start, s.classifier.shard_start + s.classifier.n_local)).state_dict()
             for s in shards]
    target = make_idmm()
    new = _rank_local(target)
    new.load_all_ranks(saved)
    torch.testing.assert_close(target.classifier.weight, full.classifier.weight, rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(new.optimizer.state[target.classifier.weight][key],
                                   ref.optimizer.state[full.classifier.weight][key], rtol=0, atol=0)
    assert new.scheduler.last_epoch == ref.scheduler.last_epoch == 1
    # and back: one rank's state split for rank 1 of 2
    back = make_idmm(world_size=2, rank=1)
    _rank_local(back).load_all_ranks([new.state_dict()])
    torch.testing.assert_close(back.classifier.weight, shards[1].classifier.weight, rtol=0, atol=0)


def test_checkpoint_of_another_training_set_is_a_clear_error():
    m = make_idmm()
    other = build_method(IDMMConfig(global_size=16, local_size=8, seed=3), make_ctx(num_samples=N + 1))
    with pytest.raises(ValueError, match="'classifier': the checkpoint's classifier has N=38 classes, this run's has 37"):
        _rank_local(m).load_state_dict(_rank_local(other).state_dict())
    with pytest.raises(ValueError, match="N=38 classes"):
        _rank_local(m).load_all_ranks([_rank_local(other).state_dict()])


def test_engine_exports_only_the_backbone_of_a_wrapping_student():
    from dist_ssl.engine.trainer import _backbone_state

    m = make_idmm(projection=True, proj_hidden_dim=8, proj_dim=4)
    state = {f"module.{k}": v for k, v in m.student.state_dict().items()}  # as DDP names them
    out = _backbone_state(state, m.student, m.backbone())
    assert set(out) == set(m.backbone().state_dict())
    assert torch.equal(out["pos_embed"], m.backbone().pos_embed)
    plain = {"a": torch.zeros(1)}
    assert _backbone_state(plain, m.backbone(), m.backbone()) is plain  # student is the backbone


def test_registered_and_buildable_from_a_recipe_dict():
    from dist_ssl.config import load_config
    from dist_ssl.methods import method_names

    assert "idmm" in method_names()
    cfg = load_config(None, ["output_dir=/tmp/x", "train.steps=1", "method.name=idmm",
                             "method.local_crops=6", "method.cutmix_alpha=1.0"])
    assert cfg.method.local_crops == 6 and cfg.method.label_smoothing == 0.1
    assert np.isclose(cfg.method.cutmix_alpha, 1.0)


def test_classifier_lr_scale_reaches_the_rank_local_optimizer_only(fmnist2k_shards, tmp_path):
    """method.classifier_lr_scale multiplies the lr of W's optimizer groups (and their schedule),
    never the backbone's."""
    from dist_ssl.config import load_config
    from dist_ssl.engine.setup import build_run

    def lrs(scale):
        cfg = load_config("recipes/idmm_fmnist2k.yaml",
                          [f"output_dir={tmp_path}/s{scale}", f"data.train={fmnist2k_shards}", "train.steps=4",
                           "data.num_workers=0", "optim.warmup_epochs=null",
                           f"method.classifier_lr_scale={scale}"])
        parts = build_run(cfg)
        return ([g["lr"] for g in parts.optimizer.param_groups],
                [g["lr"] for g in parts.rank_local.optimizer.param_groups], parts.lr)

    dp1, local1, lr = lrs(1.0)
    dp7, local7, _ = lrs(7.0)
    assert lr > 0 and dp7 == dp1 == pytest.approx([lr] * len(dp1))  # no warmup: step 0 at the run's lr
    assert local1 == pytest.approx([lr] * len(local1))
    assert local7 == pytest.approx([7.0 * lr] * len(local7))


def test_data_blur_sigma_scale_reaches_the_training_views(fmnist2k_shards, tmp_path):
    from dist_ssl.config import load_config
    from dist_ssl.engine.setup import build_run

    cfg = load_config("recipes/idmm_fmnist2k.yaml",
                      [f"output_dir={tmp_path}", f"data.train={fmnist2k_shards}", "train.steps=2",
                       "data.num_workers=0", "data.blur_sigma_scale=0.25"])
    spec = build_run(cfg).loader.spec
    assert spec.blur_sigma_scale == 0.25 and spec.groups == cfg.method.crop_groups()


def test_fractional_resolution_factor_rounds_crops_and_backbone():
    """resolution_factor 1.75 takes the 16 px / 8 px analog to the 28 px fine-tuning size: crops
    16 -> 28 and 8 -> 14, backbone native 16 -> 28 (sizes rounded)."""
    cfg = IDMMConfig(global_size=16, local_size=8, local_crops=2, small_resolution=False,
                     resolution_factor=1.75, seed=3)
    method = build_method(cfg, make_ctx(dynamic=True))
    assert [(g.count, g.size) for g in method.train_views().groups] == [(2, 28), (2, 14)]
    assert method.backbone().patch_embed.img_size == (28, 28)
