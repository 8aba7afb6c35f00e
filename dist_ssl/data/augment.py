"""Rendering planned views with PIL: crop + resize, flip, colour ops, blur, solarize.

The random draws live in :mod:`crop_plan` (``plan_views``); this module only applies a plan
to a decoded image, so the same plan gives the same view whether the image was decoded at full
size or at 1/r scale (then the box is cut in the reduced image's coordinates, see
:mod:`reduced_decode`). Views leave as uint8 [C, H, W]: workers send uint8 (a quarter of the
shared-memory traffic of float32) and batches are normalised where they are used, on the
training device (:mod:`device_views`).

Why PIL and not torchvision's tensor ops here: per 112 px view on one core (measured, see
benchmarks/README.md) PIL's brightness/contrast/saturation/hue/blur on uint8 images were each
1.3-2.5x cheaper than the same torchvision ops on uint8 tensors, and PIL's antialiased resize
from a cropped box avoids materialising the crop. The tensor versions are what the GPU-decode
path uses on the device (:mod:`device_augment`).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from dist_ssl.data.crop_plan import (  # noqa: F401 - re-exported: the historical import place
    POLICIES, Policy, ViewPlan, plan_views, sample_crop, view_rng)
from dist_ssl.data.views import ViewSpec

BICUBIC = Image.Resampling.BICUBIC
_JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
# ImageOps.solarize(img, 128) builds this table in Python on every call (~0.2 ms a view).
_SOLARIZE_LUT = [i if i < 128 else 255 - i for i in range(256)]


def _color_jitter(img: Image.Image, order, factors) -> Image.Image:
    for i in order:
        if factors[i] is None:
            continue
        if img.mode == "L" and i >= 2:
            continue  # no colour to change (saturation, hue); the draw still happened
        img = _JITTER_FNS[i](img, factors[i])
    return img


def _geometry(img: Image.Image, plan: ViewPlan, scale: int) -> Image.Image:
    """The view's pixels before photometric ops; ``img`` is the source decoded at 1/scale."""
    if plan.eval_resize is not None:
        if tuple(plan.eval_resize) != img.size:
            img = img.resize(plan.eval_resize, BICUBIC)
        top = int(round((img.height - plan.size) / 2.0))
        left = int(round((img.width - plan.size) / 2.0))
        return img.crop((left, top, left + plan.size, top + plan.size))
    left, top, w, h = plan.box
    box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
    return img.resize((plan.size, plan.size), BICUBIC, box=box)


def render_view(img: Image.Image, plan: ViewPlan, scale: int = 1) -> Image.Image:
    """One view of ``img`` (already in the output mode, "RGB" or "L") decoded at 1/scale."""
    out = _geometry(img, plan, scale)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if plan.jitter_order is not None:
        out = _color_jitter(out, plan.jitter_order, plan.jitter_factors)
    if plan.gray and out.mode == "RGB":
        out = out.convert("L").convert("RGB")
    if plan.blur_sigma is not None:
        out = out.filter(ImageFilter.GaussianBlur(radius=plan.blur_sigma))
    if plan.solarize:
        out = out.point(_SOLARIZE_LUT * len(out.getbands()))
    return out


def eval_crop(img: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
    """Resize the shorter side to floor(size / crop_pct) (bicubic), then center crop size."""
    short = math.floor(size / crop_pct)
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    plan = ViewPlan(size, (0, 0, w, h), new)
    return _geometry(img, plan, 1)


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


def output_mode(img: Image.Image, spec: ViewSpec) -> str:
    """"L" or "RGB": the mode views of ``img`` are made in.

    A grayscale source with ``in_chans=3`` is augmented in one channel and replicated at the
    end: the same pixels as augmenting ``convert("RGB")`` (colour ops are no-ops on gray) for a
    third of the work. With a hook the crop is converted first (timm transforms expect RGB).
    """
    gray = spec.in_chans == 1 or (img.mode in ("L", "LA", "1") and spec.hook is None)
    return "L" if gray else "RGB"


def render_views(img: Image.Image, spec: ViewSpec, plans: list[ViewPlan],
                 scale: int = 1) -> list[np.ndarray]:
    """All planned views of ``img`` (decoded at 1/scale) as uint8 arrays [C, H, W]."""
    img = img.convert(output_mode(img, spec))
    out = []
    for plan in plans:
        view = render_view(img, plan, scale)
        if spec.hook is not None:
            view = _run_hook(spec.hook, view, plan.hook_seed)
        arr = np.asarray(view, dtype=np.uint8)
        if arr.ndim == 2:  # gray: [H, W] -> [C, H, W]
            arr = np.repeat(arr[None], spec.in_chans, axis=0)
        else:  # transpose here, in uint8: a transposing float cast of the batch is 10x slower
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        out.append(arr)
    return out


def make_views(img: Image.Image, spec: ViewSpec, rngs: list[random.Random]) -> list[np.ndarray]:
    """All views of one fully decoded image as uint8 arrays [C, H, W]; ``rngs[i]`` drives
    view i (plans drawn from the image size, then rendered at full scale)."""
    return render_views(img, spec, plan_views(img.width, img.height, spec, rngs))


def stack_views(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 [C, H, W] arrays -> uint8 tensor [B, C, H, W] (what workers send: 4x less IPC)."""
    return torch.from_numpy(np.stack(arrays))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std``, on x's device.

    On CPU via numpy: single-threaded, so it does not fight busy DataLoader workers for cores.
    Both branches do the same float32 operations in the same order (same values).
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
