"""Device side of ``data.decode: gpu``: decode a batch of JPEGs where it is trained, render its
planned views there.

The workers ship encoded JPEGs and crop plans (:mod:`gpu_payload`). Here the batch is decoded by
``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG, batched, on CUDA; libjpeg on CPU),
and every view is cut, resized, flipped, colour-jittered, blurred and solarized with the same
plan as the CPU path would use (:mod:`device_augment`), then normalised. Views come out as
float32 [B, C, S, S] on ``device``, in view order, exactly the layout of the CPU path.

A JPEG that passed the worker's header check but does not decode here is replaced, with its id,
label and plan, by the next decodable sample of the batch (cyclically) and logged: the batch
keeps its size and the choice depends only on the data, so resume stays exact. (The CPU path
instead re-augments the replacement with a fresh draw; here the views are then duplicates.)
EXIF orientation: JPEGs with an orientation tag other than 1 are decoded upright in the worker
(``gpu_payload``), so only upright JPEGs reach ``decode_jpeg(apply_exif_orientation=False)`` here.
"""
from __future__ import annotations

import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dist_ssl.data import device_augment as dev
from dist_ssl.data.gpu_payload import COL, unpack_images
from dist_ssl.data.views import ViewSpec

log = logging.getLogger(__name__)


def _decode_one(data: torch.Tensor, device: torch.device):
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        log.warning("a JPEG did not decode on %s (replaced by another sample of the batch): %s",
                    device, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def decode_images(images: list[torch.Tensor], device: torch.device,
                  non_blocking: bool = True) -> list[torch.Tensor | None]:
    """uint8 [C, H, W] on ``device`` per item: encoded JPEGs (1-D) are decoded (in one batched
    call when all decode), pixel items ([C, H, W]) are copied; None where a JPEG fails."""
    out: list[torch.Tensor | None] = [None] * len(images)
    encoded = [i for i, t in enumerate(images) if t.ndim == 1]
    if encoded:
        try:
            decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB,
                                  device=device)
        except RuntimeError:  # find the bad one(s)
            decoded = [_decode_one(images[i], device) for i in encoded]
        for i, t in zip(encoded, decoded):
            out[i] = t
    for i, t in enumerate(images):
        if t.ndim == 3:
            out[i] = t.to(device, non_blocking=non_blocking)
    return out


def _replace_bad(images: list, batch: dict) -> tuple[list, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    index, label, plan = batch["index"], batch["label"], batch["plan"]
    good = [j for j, im in enumerate(images) if im is not None]
    if len(good) == len(images):
        return images, index, label, plan
    if not good:
        raise RuntimeError(f"no JPEG of a batch of {len(images)} decodes on the device")
    src = [j if images[j] is not None else next((g for g in good if g > j), good[0])
           for j in range(len(images))]
    pick = torch.tensor(src)
    return [images[j] for j in src], index[pick], label[pick], plan[pick]


def _channels(image: torch.Tensor, in_chans: int) -> torch.Tensor:
    """float [in_chans, H, W]: gray sources replicated, colour ones to luma for in_chans=1."""
    x = image.float()
    if in_chans == 3 and x.shape[0] == 1:
        return x.expand(3, -1, -1)
    if in_chans == 1 and x.shape[0] == 3:
        return dev.gray(x[None])[0]
    return x


def _group_crops(images: list[torch.Tensor], plan: torch.Tensor, first: int, count: int,
                 size: int) -> list[torch.Tensor]:
    """Views first..first+count-1 (one crop group) of every sample: count x [B, C, S, S]."""
    per_sample = [dev.crop_resize(img, plan[b, first:first + count, :4], size)
                  for b, img in enumerate(images)]  # B x [count, C, S, S]
    return list(torch.stack(per_sample, dim=1))  # count x [B, C, S, S]


def _photometric(x: torch.Tensor, p: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Flip, jitter, grayscale, blur, solarize of one view [B, C, S, S]; ``p`` = plan [B, K]."""
    x = torch.where(p[:, COL["flip"]].view(-1, 1, 1, 1) > 0.5, x.flip(-1), x)
    order = p[:, COL["order0"]:COL["order3"] + 1].long()
    factors = p[:, COL["brightness"]:COL["hue"] + 1]
    x = dev.color_jitter(x, p[:, COL["jitter"]] > 0.5, order, factors)
    x = dev.grayscale(x, p[:, COL["gray"]] > 0.5)
    if any(s > 0 for s in sigmas):
        kernels = torch.from_numpy(dev.blur_kernels(sigmas)).to(x.device, non_blocking=True)
        x = dev.gaussian_blur(x, kernels)
    return dev.solarize(x, p[:, COL["solarize"]] > 0.5)


def render_batch(batch: dict, spec: ViewSpec, device: torch.device,
                 non_blocking: bool = True) -> dict:
    """A :mod:`gpu_payload` batch -> {"index", "label", "views"} on ``device`` with float32
    normalised views [B, C, S, S] in view order (the CPU path's layout)."""
    images = decode_images(unpack_images(batch), device, non_blocking)
    images, index, label, plan = _replace_bad(images, batch)
    images = [_channels(im, spec.in_chans) for im in images]
    plan_dev = plan.to(device, non_blocking=non_blocking)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in spec.norm)
    views, first = [], 0
    for group in spec.groups:
        crops = _group_crops(images, plan_dev, first, group.count, group.size)
        for k, x in enumerate(crops):
            v = first + k
            sigmas = plan[:, v, COL["blur_sigma"]].tolist()  # host copy of the plan: no sync
            x = _photometric(x, plan_dev[:, v], sigmas)
            views.append(x.div_(255.0).sub_(mean).div_(std))
        first += group.count
    return {"index": index.to(device, non_blocking=non_blocking),
            "label": label.to(device, non_blocking=non_blocking), "views": views}
