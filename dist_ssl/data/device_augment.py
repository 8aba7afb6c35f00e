"""The view pipeline of :mod:`augment` as tensor ops with per-sample parameters, on any device.

Used by the GPU-decode path (:mod:`gpu_decode`) to render planned views where the batch is
trained. Each op reproduces what PIL does on the CPU path, so a plan gives the same view on
both paths up to rounding (``tests/unit/test_gpu_decode.py`` bounds the difference):

- crop + resize: PIL's antialiased bicubic (a = -0.5, support scaled by the downscale factor,
  taps clipped to the image, not to the box) as two dense weight matrices per view;
- brightness / contrast / saturation: PIL's blends (contrast against the rounded mean of the
  grayscale image, saturation against the grayscale image; results truncated as PIL does);
- hue: an HSV hue rotation (PIL quantises H, S, V to 8 bits first: differences of 1-2 levels);
- grayscale: ITU-R 601 luma (PIL's ``convert("L")`` weights);
- blur: PIL's GaussianBlur is 3 passes of an extended box filter (Gwosdek et al., 2011) with
  edge pixels repeated: the same kernel is built here and applied as one separable convolution;
- solarize: 255 - x where x >= 128.

Tensors: x is float [B, C, S, S] in 0..255 (C = 1 or 3), per-sample parameters are [B].
No op reads a value back to the host: masks select per sample with ``torch.where``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # PIL convert("L"): (19595 R + 38470 G + 7471 B) / 2**16


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_weights(lo: torch.Tensor, hi: torch.Tensor, in_size: int, out_size: int
                     ) -> torch.Tensor:
    """[V, out_size, in_size] weights of PIL's bicubic resample of [lo, hi) (float64 [V]) of an
    axis of ``in_size`` pixels to ``out_size`` (``precompute_coeffs`` in PIL's Resample.c)."""
    scale = (hi - lo) / out_size  # [V]
    support_scale = scale.clamp(min=1.0)
    support = 2.0 * support_scale
    center = lo[:, None] + (torch.arange(out_size, dtype=lo.dtype, device=lo.device) + 0.5) \
        * scale[:, None]  # [V, out]
    xmin = torch.floor(center - support[:, None] + 0.5).clamp(min=0)
    xmax = torch.floor(center + support[:, None] + 0.5).clamp(max=in_size)
    j = torch.arange(in_size, dtype=lo.dtype, device=lo.device)  # [in]
    w = _bicubic((j - center[..., None] + 0.5) / support_scale[:, None, None])
    w = w * ((j >= xmin[..., None]) & (j < xmax[..., None]))
    return w / w.sum(-1, keepdim=True)


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[V, C, size, size] views of ``image`` [C, H, W] (float): box v = (left, top, width,
    height) in pixels (float64 [V, 4], on the image's device) resized to ``size``, rounded."""
    _, h, w = image.shape
    boxes = boxes.to(torch.float64)
    wy = resample_weights(boxes[:, 1], boxes[:, 1] + boxes[:, 3], h, size).to(image.dtype)
    wx = resample_weights(boxes[:, 0], boxes[:, 0] + boxes[:, 2], w, size).to(image.dtype)
    rows = torch.einsum("vsh,chw->vcsw", wy, image)  # vertical first: fewer rows survive
    return torch.einsum("vcsw,vtw->vcst", rows, wx).round_().clamp_(0, 255)


def _col(p: torch.Tensor) -> torch.Tensor:
    return p.view(-1, 1, 1, 1).to(torch.float32)


def gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma of RGB (or the single channel itself)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).round().unsqueeze(1)


def _blend(base: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(base, x, f)`` on uint8 values: clipped, then truncated."""
    return (base + _col(factor) * (x - base)).clamp_(0, 255).floor_()


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def contrast(x, factor):
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
    return _blend(mean.expand_as(x), x, factor)


def saturation(x, factor):
    return _blend(gray(x).expand_as(x), x, factor) if x.shape[1] == 3 else x


def hue(x, shift):
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) in HSV, as torchvision's adjust_hue."""
    if x.shape[1] == 1:
        return x
    r, g, b = (x / 255.0).unbind(1)
    maxc, _ = torch.max(x / 255.0, dim=1)
    minc, _ = torch.min(x / 255.0, dim=1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(cr == 0, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + 1.0 + shift.view(-1, 1, 1).to(x.dtype), 1.0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    out = torch.gather(table, 0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]  # [B, 3, H, W]
    return (out * 255.0).round_().clamp_(0, 255)


JITTER = (brightness, contrast, saturation, hue)  # op k of crop_plan.JITTER_OPS


def color_jitter(x: torch.Tensor, on: torch.Tensor, order: torch.Tensor,
                 factors: torch.Tensor) -> torch.Tensor:
    """Per sample b with ``on[b]``: the four ops in ``order[b]`` ([B, 4] op indices) with
    ``factors[b]`` ([B, 4]: brightness, contrast, saturation, hue)."""
    for pos in range(4):
        for k, op in enumerate(JITTER):
            use = on & (order[:, pos] == k)
            x = torch.where(use.view(-1, 1, 1, 1), op(x, factors[:, k]), x)
    return x


def grayscale(x: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return torch.where(use.view(-1, 1, 1, 1), gray(x).expand_as(x), x)


def solarize(x: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    return torch.where(use.view(-1, 1, 1, 1) & (x >= 128), 255.0 - x, x)


def _box_weights(sigma: float, passes: int = 3) -> tuple[int, int, int]:
    """(integer radius l, inner weight, edge weight) of one pass of PIL's GaussianBlur(sigma),
    in PIL's units of 2**-24 and with its float32 arithmetic (``ImagingGaussianBlur``: the
    extended-box radius l + a whose ``passes`` passes have variance sigma**2, Gwosdek et al.,
    "Theoretical foundations of Gaussian convolution by extended box filtering", SSVM 2011)."""
    f32 = np.float32
    sigma2 = f32(f32(sigma) * f32(sigma) / f32(passes))
    length = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    whole = f32(math.floor((float(length) - 1.0) / 2.0))
    frac = f32((f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * sigma2))
    frac = f32(frac / (f32(6) * (sigma2 - (whole + f32(1)) * (whole + f32(1)))))
    radius = f32(whole + frac)
    inner = int(f32(1 << 24) / (radius * f32(2) + f32(1)))
    return int(radius), inner, ((1 << 24) - (int(radius) * 2 + 1) * inner) // 2


def blur_kernels(sigmas: list[float]) -> np.ndarray:
    """[B, K] integer 1-D kernels (units of 2**-24) of one pass of PIL's GaussianBlur(radius=
    sigma) per sample; a sigma of 0 gives the identity. Built on the host from the plan (no
    device sync)."""
    boxes = []
    for s in sigmas:
        if s <= 0:
            boxes.append(np.array([0.0, float(1 << 24), 0.0]))
            continue
        whole, inner, edge = _box_weights(s)
        boxes.append(np.array([edge] + [inner] * (2 * whole + 1) + [edge], dtype=np.float64))
    k = max(len(b) for b in boxes)
    return np.stack([np.pad(b, ((k - len(b)) // 2,)) for b in boxes])


def _box_pass(y: torch.Tensor, weight: torch.Tensor, vertical: bool) -> torch.Tensor:
    """One extended-box pass of [1, B*C, H, W] (float64, integer values) with edge pixels
    repeated, rounded as PIL does: (sum + 2**23) >> 24, exact in float64."""
    k = weight.shape[1]
    pad = (0, 0, k // 2, k // 2) if vertical else (k // 2, k // 2, 0, 0)
    shape = (weight.shape[0], 1, k, 1) if vertical else (weight.shape[0], 1, 1, k)
    y = F.pad(y, pad, mode="replicate")
    y = F.conv2d(y, weight.view(shape), groups=weight.shape[0])
    return torch.floor((y + float(1 << 23)) / float(1 << 24))


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's GaussianBlur of x [B, C, H, W] (integer values 0..255) with per-sample kernels of
    :func:`blur_kernels`: ``passes`` horizontal box passes, then ``passes`` vertical ones, each
    repeating the edge pixels and rounding as PIL does (one convolution with the composed
    kernel would differ near the borders). In float64: the integer sums must be exact."""
    b, c, h, w = x.shape
    weight = kernels.to(torch.float64).repeat_interleave(c, dim=0)  # [B*C, K]
    y = x.to(torch.float64).reshape(1, b * c, h, w)
    for vertical in (False, True):
        for _ in range(passes):
            y = _box_pass(y, weight, vertical)
    return y.view(b, c, h, w).to(x.dtype).clamp_(0, 255)
