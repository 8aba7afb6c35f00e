"""Every random choice of a sample's views, drawn before any pixel is decoded.

A view's plan (:class:`ViewPlan`) is its crop box in source pixels plus every photometric draw
(flip, colour-jitter order and factors, grayscale, blur sigma, solarize, a hook seed). It is a
function of the image size (known from the file header) and the view's RNG only, never of the
pixels, so:

- the loader can pick the cheapest decode that still serves every crop (a JPEG decoded at 1/2,
  1/4 or 1/8 scale, :mod:`reduced_decode`) after drawing the plan and before decoding;
- the GPU-decode path ships the plan with the JPEG bytes and renders the same views on the
  device (:mod:`gpu_decode`);
- views stay a function of (seed, epoch, id, repeat, view): resume is exact whatever the decode.

Draws happen in exactly the order of the original PIL pipeline (box, flip, jitter, gray, blur,
solarize, hook seed), one ``random.Random`` per view (:func:`view_rng`); ``random.Random``
seeds in ~6 us and draws in ~0.1 us, numpy's Generator is 5-20x slower for scalar draws.

Policies (``ViewSpec.policy``):

- ``simclr`` (Chen et al., 2020): random resized crop, flip, colour jitter (0.8, 0.8, 0.8, 0.2)
  with p=0.8, grayscale p=0.2, Gaussian blur p=0.5.
- ``dino`` (Caron et al., 2021): as BYOL/DINO: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale
  p=0.2, blur p=1.0 and solarize p=0 unless a CropGroup overrides them (DINO: 1.0 / 0.1+0.2 /
  0.5 for global 1 / global 2 / local crops).
- ``supervised`` / ``deit``: random resized crop + flip only (RandAugment, random erasing and
  mixing belong to the engine; a timm PIL transform can be hooked via ``ViewSpec.hook``).
- ``eval``: resize the shorter side to ``floor(size / crop_pct)`` then center crop ``size``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from dist_ssl.data.views import CropGroup, ViewSpec

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # op k of ViewPlan.jitter_order


@dataclass(frozen=True)
class Policy:
    """Probabilities and strengths of the photometric ops (geometry comes from CropGroup)."""

    flip_p: float = 0.5
    jitter_p: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # bright, contr, sat, hue
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # PIL GaussianBlur radius range (DINO)
    solarize_p: float = 0.0


POLICIES = {
    "simclr": Policy(jitter_p=0.8, jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.2, blur_p=0.5),
    "dino": Policy(jitter_p=0.8, jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.2, blur_p=1.0),
    "supervised": Policy(),
    "deit": Policy(),
}


@dataclass(frozen=True)
class ViewPlan:
    """One view of one sample: geometry in source pixels and every photometric draw.

    Train policies: the view is ``box`` = (left, top, width, height) of the source image
    resized (bicubic) to ``size`` x ``size``. Eval: the whole image resized to ``eval_resize``
    = (width, height), then center-cropped to ``size``. ``jitter_order`` is the order of the
    four colour ops (indices into :data:`JITTER_OPS`) and ``jitter_factors`` their factors
    (None where the policy's strength is 0: that op is not applied); both None when no jitter.
    """

    size: int
    box: tuple[int, int, int, int]
    eval_resize: Optional[tuple[int, int]] = None
    flip: bool = False
    jitter_order: Optional[tuple[int, ...]] = None
    jitter_factors: Optional[tuple[Optional[float], ...]] = None
    gray: bool = False
    blur_sigma: Optional[float] = None
    solarize: bool = False
    hook_seed: Optional[int] = None

    @property
    def room(self) -> float:
        """How many times the source region exceeds the output in its shorter direction: a
        decode at 1/r scale keeps this view at or above its output resolution iff r <= room."""
        if self.eval_resize is not None:
            return min(self.box[2] / self.eval_resize[0], self.box[3] / self.eval_resize[1])
        return min(self.box[2], self.box[3]) / self.size


def view_rng(*key: int) -> random.Random:
    """An RNG for one view, seeded by non-negative ints (seed, epoch, id, ...), collision-free."""
    packed = 0
    for k in key:
        packed = (packed << 64) | (int(k) & 0xFFFFFFFFFFFFFFFF)
    return random.Random(packed)


def sample_crop(rng: random.Random, width: int, height: int,
                scale: tuple[float, float], ratio: tuple[float, float]):
    """RandomResizedCrop box (left, top, w, h): torchvision's algorithm, our RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height  # fallback: central crop at the nearest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _draw_jitter(rng: random.Random, strength) -> tuple[tuple[int, ...], tuple]:
    """Op order and factors of torchvision's ColorJitter; a zero strength draws nothing."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    factors: list[Optional[float]] = [None] * 4
    for i in order:
        amount = strength[i]
        if amount <= 0:
            continue
        if i == 3:  # hue: a shift in [-amount, amount] turns
            factors[i] = rng.uniform(-amount, amount)
        else:
            factors[i] = rng.uniform(max(0.0, 1 - amount), 1 + amount)
    return tuple(order), tuple(factors)


def _train_plan(width: int, height: int, group: CropGroup, policy: Policy,
                rng: random.Random, hook: bool, blur_sigma_scale: float = 1.0) -> ViewPlan:
    box = sample_crop(rng, width, height, group.scale, group.ratio)
    flip = rng.random() < policy.flip_p
    order = factors = None
    if policy.jitter_p > 0 and rng.random() < policy.jitter_p:
        order, factors = _draw_jitter(rng, policy.jitter)
    gray = policy.gray_p > 0 and rng.random() < policy.gray_p
    blur_p = policy.blur_p if group.blur_p is None else group.blur_p
    sigma = rng.uniform(*policy.blur_sigma) if blur_p > 0 and rng.random() < blur_p else None
    if sigma is not None:
        sigma *= blur_sigma_scale  # after the draw: the same RNG sequence at any scale
    solarize_p = policy.solarize_p if group.solarize_p is None else group.solarize_p
    solarize = solarize_p > 0 and rng.random() < solarize_p
    return ViewPlan(group.size, box, None, flip, order, factors, gray, sigma, solarize,
                    rng.getrandbits(62) if hook else None)


def _eval_plan(width: int, height: int, group: CropGroup, rng: random.Random,
               hook: bool) -> ViewPlan:
    short = math.floor(group.size / group.crop_pct)
    if width <= height:
        resize = (short, int(short * height / width))
    else:
        resize = (int(short * width / height), short)
    return ViewPlan(group.size, (0, 0, width, height), resize,
                    hook_seed=rng.getrandbits(62) if hook else None)


def plan_views(width: int, height: int, spec: ViewSpec,
               rngs: list[random.Random]) -> list[ViewPlan]:
    """The plans of all views of a ``width`` x ``height`` image; ``rngs[i]`` drives view i."""
    hook = spec.hook is not None
    if spec.policy == "eval":
        return [_eval_plan(width, height, g, r, hook) for g, r in zip(spec.view_groups, rngs)]
    policy = POLICIES[spec.policy]
    return [_train_plan(width, height, g, policy, r, hook, spec.blur_sigma_scale)
            for g, r in zip(spec.view_groups, rngs)]


def max_reduction(plans: list[ViewPlan], limit: int = 8) -> int:
    """Largest r in 1, 2, 4, ..., limit with every view's source region >= its output at 1/r."""
    room = min(p.room for p in plans)
    r = 1
    while r * 2 <= limit and r * 2 <= room:
        r *= 2
    return r
