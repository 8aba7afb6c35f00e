"""Masks (BEiT block-wise, uniform), MAE index bookkeeping, and the data-only tokenizers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.masking import make_masks, mask_to_ids, num_masked
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.models.tokenizers import (
    PatchTokenizer, assign, build_tokenizer, kmeans_codebook, load_codebook, patchify,
    random_patches_codebook, random_projection_codebook, save_codebook)


def components(mask: torch.Tensor, grid: tuple[int, int]) -> list[int]:
    """Sizes of the 4-connected masked regions of a [h*w] mask (reference flood fill)."""
    h, w = grid
    m = mask.view(h, w).tolist()
    seen, sizes = set(), []
    for i in range(h):
        for j in range(w):
            if not m[i][j] or (i, j) in seen:
                continue
            stack, size = [(i, j)], 0
            seen.add((i, j))
            while stack:
                a, b = stack.pop()
                size += 1
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < h and 0 <= d < w and m[c][d] and (c, d) not in seen:
                        seen.add((c, d))
                        stack.append((c, d))
            sizes.append(size)
    return sizes


@pytest.mark.parametrize("grid,ratio,min_block", [((7, 7), 0.4, 4), ((14, 14), 0.4, 16), ((7, 7), 0.5, 4)])
def test_block_masks_exact_ratio_and_blocks(grid, ratio, min_block):
    index = torch.arange(40)
    masks = make_masks("block", grid, ratio, index, step=3, min_block=min_block)
    n = grid[0] * grid[1]
    assert masks.shape == (40, n) and masks.dtype == torch.bool
    assert (masks.sum(1) == num_masked(n, ratio)).all()
    comps = [components(m, grid) for m in masks]
    assert all(min(c) >= min_block for c in comps), comps
    rand = make_masks("random", grid, ratio, index, step=3)
    # blocks, not salt-and-pepper: far fewer regions than a uniform mask of the same size
    assert sum(map(len, comps)) < 0.5 * sum(len(components(m, grid)) for m in rand)


def test_masks_depend_only_on_seed_step_and_id():
    a = make_masks("block", (7, 7), 0.4, torch.tensor([5, 9]), step=7, min_block=4)
    b = make_masks("block", (7, 7), 0.4, torch.tensor([9, 3, 5]), step=7, min_block=4)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])  # batch composition is irrelevant
    assert not torch.equal(a, make_masks("block", (7, 7), 0.4, torch.tensor([5, 9]), step=8, min_block=4))
    assert not torch.equal(a, make_masks("block", (7, 7), 0.4, torch.tensor([5, 9]), step=7, seed=1, min_block=4))
    r = make_masks("random", (7, 7), 0.75, torch.arange(16), step=0)
    assert (r.sum(1) == 37).all()
    assert len({tuple(row.tolist()) for row in r}) == 16  # every image its own mask


def test_mae_unshuffle_restores_order():
    mask = make_masks("random", (7, 7), 0.75, torch.arange(4), step=1)
    ids_keep, ids_masked, ids_restore = mask_to_ids(mask)
    assert ids_keep.shape == (4, 12) and ids_masked.shape == (4, 37)
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set((~mask[b]).nonzero().flatten().tolist())
        assert set(ids_masked[b].tolist()) == set(mask[b].nonzero().flatten().tolist())
    x = torch.randn(4, 49, 3)
    shuffled = torch.cat([x.gather(1, ids_keep[..., None].expand(-1, -1, 3)),
                          x.gather(1, ids_masked[..., None].expand(-1, -1, 3))], dim=1)
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, 3)), x)
    with pytest.raises(ValueError, match="equal masked counts"):
        mask_to_ids(torch.tensor([[True, False], [True, True]]))


def test_patchify_matches_a_loop():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    for i in range(2):
        for j in range(3):
            assert torch.equal(p[:, i * 3 + j], x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, -1))


def test_tokenizers_deterministic_and_map_codebook_entries_to_themselves():
    book = random_projection_codebook(64, 16, seed=3)
    assert torch.equal(book, random_projection_codebook(64, 16, seed=3))
    assert not torch.equal(book, random_projection_codebook(64, 16, seed=4))
    assert torch.allclose(book.norm(dim=1), torch.ones(64))
    pool = torch.randn(500, 16)
    assert torch.equal(random_patches_codebook(pool, 64, 1), random_patches_codebook(pool, 64, 1))
    for codebook in (book, random_patches_codebook(pool, 64, 1)):
        tok = PatchTokenizer(codebook, patch_size=4)
        ids = torch.randint(0, 64, (2, 9))
        patches = codebook[ids] * torch.rand(2, 9, 1).add(0.5)  # cosine ignores the scale
        img = patches.view(2, 3, 3, 1, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(2, 1, 12, 12)
        assert torch.equal(tok(img), ids)


def test_kmeans_on_real_shards_converges(fmnist2k_shards):
    spec = ViewSpec([CropGroup(1, 28, (0.35, 1.0))], policy="supervised", in_chans=1)
    loader = build_train_loader(fmnist2k_shards, spec, 128, num_workers=0, seed=0)
    loader.set_epoch(0)
    batch = next(iter(loader))
    patches = patchify(batch["views"][0], 4).flatten(0, 1)  # 128 images x 49 patches of 16 px
    centroids, hist = kmeans_codebook(patches, 32, seed=0, iters=300, tol=0.0)
    objective = [h["objective"] for h in hist]
    assert all(b >= a - 1e-6 for a, b in zip(objective, objective[1:])), objective
    assert hist[-1]["changed"] == 0 and len(hist) < 300  # stopped because it converged
    ids, _ = assign(patches, centroids)  # fixed point: every centroid = its members' mean direction
    x = F.normalize(patches, dim=1)
    for k in ids.unique().tolist():
        assert torch.allclose(F.normalize(x[ids == k].sum(0), dim=0), centroids[k], atol=1e-5)
    baseline = assign(patches, random_patches_codebook(patches, 32, seed=0))[1].mean().item()
    assert objective[-1] > baseline + 0.01 and objective[-1] > objective[0]
    again, _ = kmeans_codebook(patches, 32, seed=0, iters=300, tol=0.0)
    assert torch.equal(centroids, again)


def test_codebook_files_roundtrip_and_are_checked(tmp_path):
    book = random_projection_codebook(32, 16, seed=0)
    path = save_codebook(tmp_path / "km.safetensors", book, {"kind": "kmeans"})
    assert not list(tmp_path.glob("*.tmp"))
    loaded, meta = load_codebook(path)
    assert torch.equal(loaded, book) and meta["kind"] == "kmeans"
    tok = build_tokenizer("kmeans", 32, 4, 1, path=str(path))
    assert torch.allclose(tok.codebook, book)
    pt = tmp_path / "km.pt"
    torch.save({"codebook": book, "meta": {"kind": "random_patches"}}, pt)
    assert torch.equal(build_tokenizer("random_patches", 32, 4, 1, path=str(pt)).codebook, tok.codebook)
    with pytest.raises(ValueError, match="vocab_size=64"):
        build_tokenizer("kmeans", 64, 4, 1, path=str(path))
    with pytest.raises(ValueError, match="holds a kmeans codebook"):
        build_tokenizer("random_patches", 32, 4, 1, path=str(path))
    with pytest.raises(ValueError, match="needs a codebook file"):
        build_tokenizer("kmeans", 32, 4, 1)
    with pytest.raises(FileNotFoundError, match="fit_tokenizer"):
        build_tokenizer("kmeans", 32, 4, 1, path=str(tmp_path / "missing.safetensors"))
