"""Augmentation policies on PIL images with an explicit per-view RNG.

Every random choice is drawn from a ``random.Random`` passed in by the caller (the loader
seeds it with :func:`view_rng` from (seed, epoch, id, repeat, view)), never from a global RNG
stream: the views of a sample do not depend on which worker made them or on what came before,
which is what makes a mid-epoch resume bit-identical. (``random.Random`` seeds in ~6 us and
draws in ~0.1 us; numpy's Generator is 5-20x slower for such scalar draws.) Pixel ops are PIL's,
fast on CPU for 8-bit images; views leave as uint8 [C, H, W] and are normalised batch-wise.

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

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

from dist_ssl.data.views import CropGroup, ViewSpec

BICUBIC = Image.Resampling.BICUBIC


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


def _color_jitter(img: Image.Image, rng: random.Random, strength) -> Image.Image:
    b, c, s, h = strength
    ops = [(TF.adjust_brightness, b, False), (TF.adjust_contrast, c, False),
           (TF.adjust_saturation, s, False), (TF.adjust_hue, h, True)]
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for i in order:
        fn, amount, is_hue = ops[i]
        if amount <= 0:
            continue
        if is_hue:
            factor = rng.uniform(-amount, amount)
        else:
            factor = rng.uniform(max(0.0, 1 - amount), 1 + amount)
        if img.mode == "L" and fn in (TF.adjust_saturation, TF.adjust_hue):
            continue  # no colour to change; the draw above still happens (stable RNG use)
        img = fn(img, factor)
    return img


def augment_crop(img: Image.Image, group: CropGroup, policy: Policy,
                 rng: random.Random) -> Image.Image:
    """One training view of ``img`` (already in the output mode, "RGB" or "L")."""
    left, top, w, h = sample_crop(rng, img.width, img.height, group.scale, group.ratio)
    out = img.resize((group.size, group.size), BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < policy.flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if policy.jitter_p > 0 and rng.random() < policy.jitter_p:
        out = _color_jitter(out, rng, policy.jitter)
    if policy.gray_p > 0 and rng.random() < policy.gray_p and out.mode == "RGB":
        out = out.convert("L").convert("RGB")
    blur_p = policy.blur_p if group.blur_p is None else group.blur_p
    if blur_p > 0 and rng.random() < blur_p:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*policy.blur_sigma)))
    solarize_p = policy.solarize_p if group.solarize_p is None else group.solarize_p
    if solarize_p > 0 and rng.random() < solarize_p:
        out = ImageOps.solarize(out, 128)
    return out


def eval_crop(img: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
    """Resize the shorter side to floor(size / crop_pct) (bicubic), then center crop size."""
    short = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:
        new = (short, int(short * h / w))
    else:
        new = (int(short * w / h), short)
    if new != (w, h):
        img = img.resize(new, BICUBIC)
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _run_hook(hook, img: Image.Image, seed: int) -> Image.Image:
    """Run a global-RNG transform (timm, torchvision) seeded per crop, restoring RNG state."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return hook(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def make_views(img: Image.Image, spec: ViewSpec, rngs: list[random.Random]) -> list[np.ndarray]:
    """All views of one decoded image as uint8 arrays [C, H, W]; ``rngs[i]`` drives view i.

    A grayscale source with ``in_chans=3`` is augmented in one channel and replicated at the
    end: the same pixels as augmenting ``convert("RGB")`` (colour ops are no-ops on gray) for a
    third of the work. With a hook the crop is converted first (timm transforms expect RGB).
    """
    gray = spec.in_chans == 1 or (img.mode in ("L", "LA", "1") and spec.hook is None)
    img = img.convert("L" if gray else "RGB")
    policy = POLICIES.get(spec.policy)
    out = []
    for group, rng in zip(spec.view_groups, rngs):
        if spec.policy == "eval":
            view = eval_crop(img, group.size, group.crop_pct)
        else:
            view = augment_crop(img, group, policy, rng)
        if spec.hook is not None:
            view = _run_hook(spec.hook, view, rng.getrandbits(62))
        arr = np.asarray(view, dtype=np.uint8)
        if arr.ndim == 2:  # gray: [H, W] -> [C, H, W]
            arr = np.repeat(arr[None], spec.in_chans, axis=0)
        else:  # transpose here, in uint8: a transposing float cast of the batch is 10x slower
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        out.append(arr)
    return out


def stack_views(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 [C, H, W] arrays -> uint8 tensor [B, C, H, W] (what workers send: 4x less IPC)."""
    return torch.from_numpy(np.stack(arrays))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std``, on x's device.

    On CPU via numpy: single-threaded, so it does not fight busy DataLoader workers for cores.
    """
    if x.device.type != "cpu":
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return x.float().div_(255.0).sub_(m).div_(s)
    y = x.numpy().astype(np.float32)
    y /= np.float32(255.0)
    y -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    y /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy(y)
