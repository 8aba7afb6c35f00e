"""Frozen-backbone features: load an export, extract pooled features over ranks, save them.

Shape legend: [B] batch, [N] samples of a whole split (all ranks), [D] feature dim
(``backbone.num_features``), [C, S, S] one image (channels, side).

``extract_features`` gives every rank the same full set, sorted by instance id, so what is
computed from it (k-NN, linear probe) does not depend on the world size or the rank.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import timm
import torch
import torch.distributed as dist
from torch import nn

from dist_ssl.atomic import atomic_save_safetensors
from dist_ssl.errors import UserError, first_line
from dist_ssl.models import (ModelConfig, create_backbone, load_backbone_file,  # registers
                             load_backbone_state, read_export_metadata,  # the small ViTs
                             timm_pretrained_kwargs)
from dist_ssl.parallel.collectives import all_gather_cat, is_dist
from dist_ssl.run_files import BACKBONE_FILE

__all__ = ["BACKBONE_FILE", "EvalError", "extract_features", "gather_sorted", "local_features",
           "load_frozen_backbone", "resolve_backbone_path", "save_features"]

log = logging.getLogger(__name__)


class EvalError(UserError):
    """A problem with the evaluation inputs; the message is one line meant for a user."""


def resolve_backbone_path(path: str | os.PathLike) -> Path:
    """A run dir (``<dir>/backbone.safetensors``) or an export file -> the export file."""
    p = Path(path)
    if p.is_dir():
        p = p / BACKBONE_FILE
    if not p.is_file():
        raise EvalError(f"{p}: backbone file not found (give a run dir with {BACKBONE_FILE} "
                        f"or a .safetensors export)")
    return p


def load_frozen_backbone(path: str | os.PathLike,
                         img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Headless backbone from an export (eval mode, no grad) and its metadata.

    At the export's own resolution timm loads the file itself (``timm_pretrained_kwargs``); at
    another ``img_size`` the model is built at that size and ``load_backbone_state`` resamples
    ``pos_embed``. Returns (model, {"architecture", "in_chans", "img_size", "num_features"}).
    """
    path = Path(path)
    try:
        meta = read_export_metadata(path)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise EvalError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    arch = meta.get("architecture", "")
    if not arch or "in_chans" not in meta or "img_size" not in meta:
        raise EvalError(f"{path}: no architecture/in_chans/img_size metadata "
                        f"(not written by dist_ssl.models.export_backbone?)")
    in_chans = _meta_int(path, meta, "in_chans", meta["in_chans"])
    if in_chans not in (1, 3):
        raise EvalError(f"{path}: backbone expects in_chans={in_chans}; the shard loader makes "
                        f"1 (grayscale) or 3 (RGB) channel images")
    native = _meta_int(path, meta, "img_size", meta["img_size"].split("x")[0])
    size = native if img_size is None else int(img_size)
    if not timm.is_model(arch):
        raise EvalError(f"{path}: cannot load {arch} at {size}px: unknown architecture (not a timm or "
                        "dist_ssl model name; was the export written by another version?)")
    try:
        if size == native:
            # timm builds a fixed-size model at its arch default unless told (registered small
            # ViTs: 28 px), and would then silently resample a 16 px export's pos_embed on load
            fixed = timm.models.get_pretrained_cfg_value(arch, "fixed_input_size")
            model = timm.create_model(arch, num_classes=0, in_chans=in_chans, **({"img_size": size} if fixed else {}),
                                      **timm_pretrained_kwargs(path))
        else:
            model = create_backbone(ModelConfig(name=arch, img_size=size, in_chans=in_chans))
            load_backbone_state(model, load_backbone_file(path))
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise EvalError(f"{path}: cannot load {arch} at {size}px: {first_line(e)}") from None
    model.eval().requires_grad_(False)
    info = {"architecture": arch, "in_chans": in_chans, "img_size": size,
            "native_img_size": native, "num_features": int(model.num_features)}
    return model, info


def _meta_int(path: Path, meta: dict, key: str, text: str) -> int:
    """A positive integer of the export's metadata, or a one-line EvalError naming the key."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EvalError(f"{path}: metadata {key}={meta[key]!r} is not a positive integer "
                        f"(re-export the backbone with dist_ssl.models.export_backbone)")
    return value


@torch.no_grad()
def local_features(backbone: nn.Module, loader: Iterable[dict],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (feats [n, D] float32, labels [n], index [n]) on CPU, in loader order."""
    was_training = backbone.training
    backbone.eval()
    feats, labels, index = [], [], []
    try:
        for batch in loader:
            x = batch["views"][0].to(device, non_blocking=True)  # [B, C, S, S]
            feats.append(backbone(x).float().cpu())  # [B, D] pooled
            labels.append(batch["label"])
            index.append(batch["index"])
    finally:
        backbone.train(was_training)
    if not feats:  # a rank may own no sample (N < world size): still take part in the gather
        dim = int(getattr(backbone, "num_features"))
        return torch.empty(0, dim), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(index).long()


def gather_sorted(feats: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every rank's rows and sort by index: [n_r, *] per rank -> [N, *] on all."""
    # NCCL only moves CUDA tensors, gloo CPU ones: three gathers of small [N, D] tensors.
    comm = device if is_dist() and dist.get_backend() == "nccl" else torch.device("cpu")
    out = [all_gather_cat(t.to(comm)).cpu() for t in (feats, labels, index)]
    order = torch.argsort(out[2], stable=True)
    feats, labels, index = (t[order] for t in out)
    if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
        raise RuntimeError("extract_features: an instance id was seen twice over ranks")
    return feats, labels, index


def extract_features(backbone: nn.Module, loader: Iterable[dict],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features of every sample of ``loader`` over all ranks.

    ``loader`` is this rank's eval loader (``build_eval_loader(..., rank, world_size)``).
    Returns (feats [N, D] float32, labels [N] long, index [N] long) on CPU, sorted by index,
    identical on every rank. Collective when a process group exists: every rank must call it.
    Corrupt samples dropped by the loader are simply absent (N may be < the manifest's count).
    """
    return gather_sorted(*local_features(backbone, loader, device), device)


def save_features(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    """Write named tensors (e.g. train_feats [N, D], train_labels [N]) atomically as safetensors."""
    return atomic_save_safetensors(path, tensors, metadata)
