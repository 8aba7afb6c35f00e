"""Worker side of ``data.decode: gpu``: JPEG bytes + crop plans instead of views.

A worker parses each sample's header, draws every view's plan from the image size (the same
seeded draws as the CPU path, :mod:`crop_plan`) and ships the still-encoded JPEG with the plan
as numbers. The training process decodes the batch on its device and renders the views there
(:mod:`gpu_decode`). Per image a worker then costs a header parse and a few hundred plan draws
instead of a decode and six rendered crops.

Samples that are not upright baseline RGB/gray JPEGs (PNG, CMYK JPEG, a JPEG with an EXIF
orientation other than 1, ...) are decoded here instead (upright, 8-bit: ``load_image``) and
shipped as uint8 pixels [C, H, W]; the device renders them with the same code. A sample whose
header does not parse is corrupt (replaced by the loader as on the CPU path); a JPEG that parses
but fails to decode on the device is handled there (:func:`gpu_decode.decode_images`).

Batch layout (B = batch, V = views per sample, K = ``len(PLAN_FIELDS)``)::

    {"index": LongTensor [B], "label": LongTensor [B],
     "images": uint8 Tensor [total bytes]: every sample's JPEG bytes or pixels, concatenated,
     "shapes": LongTensor [B, 3]: (C, H, W) of pixels, (0, 0, nbytes) of an encoded JPEG,
     "plan": Float64Tensor [B, V, K]}

One buffer per batch, not B tensors: each tensor crossing the worker boundary costs a shared-
memory segment (and a file descriptor while in flight). :func:`unpack_images` splits it.
"""
from __future__ import annotations

import numpy as np
import torch

from dist_ssl.data.augment import output_mode
from dist_ssl.data.canonical_image import exif_orientation
from dist_ssl.data.crop_plan import ViewPlan, plan_views
from dist_ssl.data.decode import load_image, open_sample
from dist_ssl.data.reduced_decode import RngsFor
from dist_ssl.data.views import ViewSpec

# Columns of a plan row. Jitter factors of ops the policy does not use are identities
# (brightness/contrast/saturation 1, hue 0); blur_sigma 0 = no blur.
PLAN_FIELDS = ("left", "top", "width", "height", "flip", "jitter", "order0", "order1", "order2",
               "order3", "brightness", "contrast", "saturation", "hue", "gray", "blur_sigma",
               "solarize")
COL = {name: i for i, name in enumerate(PLAN_FIELDS)}
_IDENTITY = (1.0, 1.0, 1.0, 0.0)
_DEVICE_MODES = ("RGB", "L")  # JPEG modes the device decoder takes as they are


def check_spec(spec: ViewSpec) -> None:
    """The GPU path renders train policies without a PIL hook; say so early if not."""
    if spec.hook is not None:
        raise ValueError("data.decode=gpu cannot run ViewSpec.hook (a PIL transform such as "
                         "RandAugment) on the device; use data.decode=cpu for this method")
    if spec.policy == "eval":
        raise ValueError("data.decode=gpu is for training views; eval loaders decode on the CPU")


def plan_row(plan: ViewPlan) -> list[float]:
    """A :class:`ViewPlan` as the numbers of :data:`PLAN_FIELDS`."""
    jitter = plan.jitter_order is not None
    order = plan.jitter_order if jitter else (0, 1, 2, 3)
    factors = [_IDENTITY[i] if not jitter or f is None else f
               for i, f in enumerate(plan.jitter_factors or (None,) * 4)]
    return [*plan.box, float(plan.flip), float(jitter), *order, *factors, float(plan.gray),
            plan.blur_sigma or 0.0, float(plan.solarize)]


def prepare(sample, spec: ViewSpec, rngs_for: RngsFor) -> tuple[dict, int, int]:
    """({"image": uint8 tensor, "plan": [V, K] float64}, class id, instance id) of one sample.

    Raises :class:`~dist_ssl.data.decode.SampleError` if the header does not parse (or, for a
    format decoded here, the pixels do not decode).
    """
    opened = open_sample(sample)
    width, height = opened.size  # upright (EXIF orientation)
    plans = plan_views(width, height, spec, rngs_for(opened.idx))
    plan = torch.tensor([plan_row(p) for p in plans], dtype=torch.float64)
    upright = opened.size == opened.image.size and exif_orientation(opened.image) == 1
    if opened.image.format == "JPEG" and opened.image.mode in _DEVICE_MODES and upright:
        image = torch.frombuffer(bytearray(opened.data), dtype=torch.uint8)
    else:
        img, _ = load_image(opened)
        arr = np.asarray(img.convert(output_mode(img, spec)), dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(arr))
    return {"image": image, "plan": plan}, opened.label, opened.idx


def collate(decoded: list[tuple[dict, int, int]]) -> dict:
    """Items of :func:`prepare` -> the batch layout of this module's docstring."""
    images = [d[0]["image"] for d in decoded]
    shapes = [(0, 0, t.numel()) if t.ndim == 1 else tuple(t.shape) for t in images]
    return {"index": torch.tensor([d[2] for d in decoded], dtype=torch.long),
            "label": torch.tensor([d[1] for d in decoded], dtype=torch.long),
            "images": torch.cat([t.reshape(-1) for t in images]),
            "shapes": torch.tensor(shapes, dtype=torch.long),
            "plan": torch.stack([d[0]["plan"] for d in decoded])}


def unpack_images(batch: dict) -> list[torch.Tensor]:
    """Per sample: its encoded JPEG (uint8 [nbytes]) or pixels (uint8 [C, H, W]), as views
    of the batch's buffer (no copies)."""
    out, start = [], 0
    for c, h, w in batch["shapes"].tolist():
        n = w if c == 0 else c * h * w
        item = batch["images"][start:start + n]
        out.append(item if c == 0 else item.view(c, h, w))
        start += n
    return out


def is_payload(batch: dict) -> bool:
    """Whether ``batch`` holds encoded images + plans (this module) rather than views."""
    return "plan" in batch and "shapes" in batch
