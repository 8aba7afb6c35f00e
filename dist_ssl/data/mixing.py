"""CutMix (Yun et al., 2019) on instance labels, as IDMM uses it (Cao, Yu & Wu, ECCV 2022).

A box of the partner image is pasted into every image of a batch; the label becomes the mix of
the two *instance* ids weighted by the area each one keeps. One draw (lam, box, partner
permutation) is shared by the whole batch, as in the reference implementations (timm's
``Mixup``, the IDMM code); IDMM draws once per crop group (see ``dist_ssl.methods.idmm``).

``fold=True`` is the official IDMM code's variant (``utils/mixup_utils.py: cutmix_data``):
``lam = max(lam, 1 - lam)`` right after the Beta draw, so the box side is at most
sqrt(1/2) of the image side and every image keeps at least half of its own pixels (its own
instance id always has the larger weight). ``fold=False`` is plain CutMix (Yun et al.; timm),
where the pasted patch may cover almost the whole image. The rest is the same in both: box
side sqrt(1 - lam) x image side (truncated to whole pixels), centre uniform over the image,
clipped at the border, then lam recomputed as the exact kept-pixel fraction.

Randomness comes from an explicit ``numpy.random.Generator``: IDMM seeds one per
(seed, rank, step, micro-step) with :func:`mix_rng`, so the draws are a function of the global
step (a resumed run mixes exactly like an uninterrupted one) and never depend on, or disturb,
the global RNG streams that the data loader and dropout consume.

Shapes: x [B, C, H, W]; ids, target_a, target_b, lam, perm [B].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MixedBatch", "cutmix_instances", "mix_rng", "rand_box"]


@dataclass
class MixedBatch:
    """A batch after CutMix: soft target (1-lam)/lam between ``target_a`` and ``target_b``."""

    images: torch.Tensor    # [B, C, H, W] mixed images
    target_a: torch.Tensor  # [B] long: own instance id (weight lam)
    target_b: torch.Tensor  # [B] long: partner's instance id (weight 1 - lam)
    lam: torch.Tensor       # [B] float32: area fraction each image keeps (1.0 = unmixed)
    perm: torch.Tensor      # [B] long: partner row of each row (target_b = target_a[perm])
    box: tuple[int, int, int, int]  # (top, bottom, left, right) of the pasted region, pixels


def mix_rng(*key: int) -> np.random.Generator:
    """A generator seeded by non-negative ints, e.g. (seed, rank, step, micro_step)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFFFFFFFFFF for k in key])


def rand_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix box of area about (1 - lam) * H * W, centre uniform over the image, clipped at the
    border (so the kept area is corrected afterwards from the real box)."""
    cut = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return top, bottom, left, right


def cutmix_instances(x: torch.Tensor, ids: torch.Tensor, alpha: float,
                     rng: np.random.Generator, *, fold: bool = False) -> MixedBatch:
    """Paste a box of ``x[perm]`` into ``x`` (a new tensor; ``x`` is left untouched).

    lam ~ Beta(alpha, alpha), folded to max(lam, 1 - lam) when ``fold`` (the official IDMM
    code); the box follows lam, then lam is recomputed as the exact fraction of pixels each
    image keeps (box area-corrected, as timm's ``correct_lam``). The partner is a random
    permutation of the same batch (a row may be its own partner: then it is unmixed).
    ``alpha <= 0`` returns the batch unmixed (lam = 1, perm = identity). The draws, in order:
    lam, permutation, box centre (row, column); folding consumes no extra draw, so a key
    gives the same permutation and box centre with or without it.
    """
    b, _, h, w = x.shape
    ids = ids.to(x.device)
    if alpha <= 0 or b == 0:
        ident = torch.arange(b, device=x.device)
        return MixedBatch(x, ids, ids, torch.ones(b, device=x.device), ident, (0, 0, 0, 0))
    lam = float(rng.beta(alpha, alpha))
    if fold:
        lam = max(lam, 1.0 - lam)
    perm = torch.from_numpy(rng.permutation(b)).to(x.device)
    top, bottom, left, right = rand_box(h, w, lam, rng)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[:, :, top:bottom, left:right][perm]
    kept = 1.0 - (bottom - top) * (right - left) / float(h * w)
    return MixedBatch(mixed, ids, ids[perm], torch.full((b,), kept, device=x.device), perm,
                      (top, bottom, left, right))
