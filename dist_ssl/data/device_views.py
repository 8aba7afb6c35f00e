"""The one place where a loader batch becomes what a method receives: tensors on the device,
views normalised float.

Training loaders send views as uint8 [B, C, S, S] (``uint8_views=True``; pinned when
``data.pin_memory``) or, with ``data.decode: gpu``, encoded JPEGs + crop plans
(:mod:`gpu_payload`). :func:`batch_to_device` copies them to the device (``non_blocking`` from
``data.non_blocking``) and finishes them there:

- uint8 views -> ``(x / 255 - mean) / std`` in float32 on the device (:func:`augment.normalize`:
  the same float32 operations as the loader's former CPU normalisation, so a method receives the
  same values, bit for bit on CPU), then cast to ``dtype`` if given (DeepSpeed bf16/fp16);
- a GPU-decode payload -> decoded and rendered on the device (:func:`gpu_decode.render_batch`);
- float views (a loader built with ``uint8_views=False``) -> copied and cast as they are.

Batch in and out: {"index": [B], "label": [B], "views": [[B, C, S_i, S_i] per view i]}.
"""
from __future__ import annotations

from typing import Optional

import torch

from dist_ssl.data.augment import normalize
from dist_ssl.data.gpu_payload import is_payload
from dist_ssl.data.views import ViewSpec


def _view_to_device(view: torch.Tensor, spec: ViewSpec, device, non_blocking: bool):
    view = view.to(device, non_blocking=non_blocking)
    return normalize(view, *spec.norm) if view.dtype == torch.uint8 else view


def batch_to_device(batch: dict, spec: ViewSpec, device: torch.device,
                    dtype: Optional[torch.dtype] = None, non_blocking: bool = True) -> dict:
    """``batch`` on ``device`` with float32 (or ``dtype``) normalised views; see the module."""
    if is_payload(batch):
        from dist_ssl.data.gpu_decode import render_batch  # torchvision.io only when used
        out = render_batch(batch, spec, device, non_blocking)
        rest = {k: v for k, v in batch.items()
                if k not in ("images", "shapes", "plan", "index", "label")}
    else:
        out = {"views": [_view_to_device(v, spec, device, non_blocking) for v in batch["views"]]}
        rest = {k: v for k, v in batch.items() if k != "views"}
    for key, value in rest.items():
        out[key] = value.to(device, non_blocking=non_blocking) \
            if isinstance(value, torch.Tensor) else value
    if dtype is not None:
        out["views"] = [v.to(dtype) for v in out["views"]]
    return out
