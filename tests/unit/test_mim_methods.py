"""BEiT, SplitMask and MAE on a tiny ViT: smoke, masking semantics, and learning on real images."""
from __future__ import annotations

import pytest
import torch

import dist_ssl.methods  # noqa: F401  (registers every method's config; build_method imports the method)
from dist_ssl.config.schema import from_dict
from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.masking import mask_to_ids
from dist_ssl.heads.mim_decoder import MIMDecoder
from dist_ssl.models.vit_tokens import encode_visible
from dist_ssl.losses.mim import masked_pixel_loss, masked_token_loss, pixel_targets
from dist_ssl.methods import MethodConfig, MethodContext, build_method
from dist_ssl.models.config import ModelConfig

TINY = {"beit": {"vocab_size": 64, "mask_min_block": 4},
        "splitmask": {"vocab_size": 64, "mask_min_block": 4},
        "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}}


def make(name: str, **overrides):
    torch.manual_seed(0)
    cfg = from_dict(MethodConfig, {"name": name, **TINY.get(name, {}), **overrides})
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1),
                        num_samples=2040, num_classes=10, in_chans=1)
    return build_method(cfg, ctx)


def fake_batch(b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(b, 1, 28, 28, generator=g)], "index": torch.arange(b) * 3,
            "label": torch.arange(b) % 10}


@pytest.fixture(scope="module")
def real_batch(fmnist2k_shards) -> dict:
    """8 real Fashion-MNIST training views, normalised as the loader gives them."""
    spec = make("mae").train_views()
    loader = build_train_loader(fmnist2k_shards, spec, 8, num_workers=0, seed=0)
    loader.set_epoch(0)
    return next(iter(loader))


@pytest.mark.parametrize("name", ["beit", "splitmask", "mae"])
def test_masks_follow_step_and_ids_not_the_global_rng(name):
    """(The generic one-step smoke, state and export checks: tests/unit/test_method_registry.py.)"""
    def loss(step: int, global_seed: int) -> torch.Tensor:
        method = make(name)
        torch.manual_seed(global_seed)
        return method(fake_batch(), step=step)["loss"].detach()

    assert torch.equal(loss(3, global_seed=1), loss(3, global_seed=2))
    assert not torch.equal(loss(4, global_seed=1), loss(3, global_seed=1))


def test_splitmask_subsets_disjoint_covering_and_encoders_see_one_subset():
    for overrides in ({}, {"mask": "random", "mask_ratio": 0.75}):
        method = make("splitmask", **overrides).eval()
        batch = fake_batch()
        ids_a, ids_b, restore_a, restore_b = method.split(batch, step=5)
        n_b = 24 if not overrides else 37
        assert ids_a.shape == (8, 49 - n_b) and ids_b.shape == (8, n_b)
        for row_a, row_b in zip(ids_a.tolist(), ids_b.tolist()):
            assert not set(row_a) & set(row_b) and sorted(row_a + row_b) == list(range(49))
        # each branch's decoder input (own encodings, then mask tokens) goes back to patch order
        order = torch.arange(49).expand(8, 49)
        assert torch.equal(torch.cat([ids_a, ids_b], 1).gather(1, restore_a), order)
        assert torch.equal(torch.cat([ids_b, ids_a], 1).gather(1, restore_b), order)
        x = batch["views"][0]
        enc_a, enc_b = method.student.encode(x, ids_a, ids_b)
        # change only B's pixels: A's encoding must not move, B's must
        patch_b = torch.zeros(8, 49, dtype=torch.bool).scatter_(1, ids_b, True)
        pix = patch_b.view(8, 1, 7, 1, 7, 1).expand(8, 1, 7, 4, 7, 4).reshape(8, 1, 28, 28)
        enc_a2, enc_b2 = method.student.encode(x + 3.0 * pix, ids_a, ids_b)
        assert torch.allclose(enc_a, enc_a2, atol=1e-6) and not torch.allclose(enc_b, enc_b2)


def test_decoder_places_mask_tokens_at_the_missing_positions():
    torch.manual_seed(0)
    dec = MIMDecoder((7, 7), in_dim=8, dim=8, depth=1, num_heads=2, out_dim=5)
    mask = torch.zeros(3, 49, dtype=torch.bool)
    mask[0, [0, 5, 48]] = True
    mask[1, [1, 2, 3]] = True
    mask[2, [40, 41, 47]] = True
    ids_keep, ids_masked, ids_restore = mask_to_ids(mask)
    visible = torch.randn(3, 46, 8)
    seq = dec.assemble(visible, ids_restore)
    for b in range(3):
        for pos in range(49):
            if mask[b, pos]:
                assert torch.equal(seq[b, pos], dec.mask_token[0, 0])
            else:
                k = ids_keep[b].tolist().index(pos)
                assert torch.equal(seq[b, pos], visible[b, k])
    assert dec(visible, ids_restore).shape == (3, 49, 8)


def test_mae_and_beit_encoders_ignore_masked_pixels():
    x = fake_batch()["views"][0]
    mae = make("mae").eval()
    mask = torch.zeros(8, 49, dtype=torch.bool)
    mask[:, :37] = True
    ids_keep, _, ids_restore = mask_to_ids(mask)
    pix = mask.view(8, 1, 7, 1, 7, 1).expand(8, 1, 7, 4, 7, 4).reshape(8, 1, 28, 28)
    vit = mae.backbone()
    assert torch.allclose(encode_visible(vit, x, ids_keep), encode_visible(vit, x + 5 * pix, ids_keep), atol=1e-6)
    assert mae.student(x, ids_keep, ids_restore).shape == (8, 49, 16)
    beit = make("beit").eval()
    logits = beit.student(x, mask)
    assert logits.shape == (8 * 37, 64)
    assert torch.allclose(logits, beit.student(x + 5 * pix, mask), atol=1e-5)
    assert not torch.allclose(logits, beit.student(x - 5 * (~pix), mask), atol=1e-3)


def test_mim_losses_against_reference():
    x = torch.randn(2, 1, 8, 8)
    target = pixel_targets(x, 4, norm_pix=True)  # [2, 4, 16]
    patch = x[1, 0, 4:8, 0:4].flatten()  # patch (1, 0) of image 1 = row 2 of the grid
    assert torch.allclose(target[1, 2], (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5, atol=1e-5)
    assert torch.equal(pixel_targets(x, 4, norm_pix=False)[1, 2], patch)
    pred = torch.randn(2, 4, 16)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    per_patch = [((pred[b, n] - target[b, n]) ** 2).mean() for b in range(2) for n in range(4) if mask[b, n]]
    assert torch.allclose(masked_pixel_loss(pred, target, mask), torch.stack(per_patch).mean())
    logits, ids = torch.randn(6, 10), torch.tensor([1, 2, 3, 4, 5, 6])
    loss, acc = masked_token_loss(logits, ids)
    ref = -torch.log_softmax(logits, -1)[torch.arange(6), ids].mean()
    assert torch.allclose(loss, ref) and acc == (logits.argmax(-1) == ids).float().mean()


@pytest.mark.parametrize("name", ["beit", "splitmask", "mae"])
def test_loss_falls_when_overfitting_real_images(name, real_batch):
    method = make(name)
    opt = torch.optim.AdamW(method.student.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = method(real_batch, step=0)["loss"]  # same masks every time: pure memorisation
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
