"""Backbone-only export as safetensors that ``timm.create_model(..., pretrained=True)`` loads.

Load an export back with timm (headless by default; ``num_classes=K`` gives a fresh head)::

    import dist_ssl.models.factory  # registers the small variants; not needed for stock timm names
    model = timm.create_model(name, **timm_pretrained_kwargs(path))

``timm_pretrained_kwargs`` gives ``pretrained=True`` and
``pretrained_cfg_overlay=dict(file=path, num_classes=<file's>, input_size=(C, H, W))``. Why the
overlay needs more than ``file``: timm loads strictly when the model's num_classes equals the
cfg's (1000 for ImageNet names), so a headless file then fails on missing ``head.*``; and it
checks the first conv against ``input_size[0]``, so a 1-channel export needs ``input_size``.
Safetensors holds tensors only (no pickle), so loading a file runs no code.

A run with a semantic classifier (supervised training / fine-tuning) also writes its head on
its own, ``head.safetensors`` (:func:`export_head`: e.g. ``head.weight`` [K, D], ``head.bias``
[K], metadata ``num_classes`` = K), so the backbone export stays backbone-only for every
consumer while a continuation (the 448 px stage after 224 px, ``method.init_head``) can load
the classifier too, as the official IDMM code does. The full classifier in timm::

    model = timm.create_model(name, num_classes=K, **timm_pretrained_kwargs(backbone_path))
    model.load_state_dict(load_head_file(head_path), strict=False)
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dist_ssl.atomic import atomic_save_safetensors
from dist_ssl.run_files import HEAD_FILE  # re-exported: the classifier head, beside the backbone

from .factory import classifier_names

__all__ = [
    "HEAD_FILE",
    "export_backbone",
    "export_head",
    "export_state_dict",
    "load_backbone_file",
    "load_head_file",
    "read_export_metadata",
    "strip_wrapper_prefixes",
    "timm_pretrained_kwargs",
    "unwrap_model",
]

PathLike = Union[str, os.PathLike]

# DDP/DeepSpeed add "module." in front; torch.compile adds "_orig_mod." (also inside compiled
# submodules); FSDP1 and activation checkpointing insert their wrapper names at any depth.
_LEADING = re.compile(r"^(?:module\.|_orig_mod\.)+")
_ANYWHERE = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as the bare timm model names them (wrapper prefixes removed); values untouched."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        clean = _ANYWHERE.sub("", _LEADING.sub("", key))
        if clean in out:
            raise ValueError(f"{key}: clashes with another key after stripping wrappers ({clean})")
        out[clean] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP / DataParallel / DeepSpeed / torch.compile wrappers (FSDP2 shards in place).

    A wrapper is recognised by shape, not type, so no engine needs importing: its only child
    is ``.module`` (DDP, DeepSpeedEngine, FSDP1) or ``._orig_mod`` (``torch.compile(m)``), in
    any nesting order (``torch.compile(DDP(m))``, ``DDP(torch.compile(m))``). A module compiled
    in place (``m.compile()``, what ``parallel.compile`` does) has no wrapper: it is returned
    as is, with its own names and parameters.
    """
    while True:
        children = list(model.children())
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and len(children) == 1 and children[0] is inner:
            model = inner
        else:
            return model


def _to_plain_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if hasattr(t, "full_tensor"):  # DTensor (FSDP2): a collective, every rank must call export
            t = t.full_tensor()
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights, views): copy the repeats.
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    drop_prefixes: tuple[str, ...] = ("head",),
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write ``state_dict`` (minus keys under ``drop_prefixes``) atomically as safetensors.

    Use this for a full state dict already gathered from a sharded model (e.g.
    ``accelerator.get_state_dict(model)`` on rank 0); ``export_backbone`` for a module.
    """
    clean = strip_wrapper_prefixes(state_dict)
    kept = {k: v for k, v in clean.items() if not _under(k, drop_prefixes)}
    tensors = _to_plain_cpu(kept)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_safetensors(path, tensors, {"format": "pt", **(metadata or {})})


def backbone_metadata(model: nn.Module, *, keep_head: bool = False) -> dict[str, str]:
    """Header fields of an export: architecture, in_chans, img_size, num_classes, num_features
    (what ``timm_pretrained_kwargs`` turns into the overlay timm needs)."""
    bare = unwrap_model(model)
    heads = classifier_names(bare)
    has_head = any(p.numel() for n in heads for p in bare.get_submodule(n).parameters())
    meta = {
        "architecture": str((getattr(bare, "pretrained_cfg", None) or {}).get("architecture", "")),
        "in_chans": str(_in_chans(bare)),
        "num_classes": str(int(getattr(bare, "num_classes", 0)) if keep_head and has_head else 0),
        "num_features": str(int(getattr(bare, "num_features", 0))),
    }
    # ViT/Swin know their resolution; size-agnostic nets keep their cfg's nominal one.
    img_size = getattr(getattr(bare, "patch_embed", None), "img_size", None)
    if img_size is None and (getattr(bare, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        img_size = getattr(bare, "img_size", None)  # fixed-size nets without a patch embedding (T2T-ViT)
        img_size = (img_size, img_size) if isinstance(img_size, int) else img_size
    if img_size is None:
        img_size = ((getattr(bare, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[-2:]
    meta["img_size"] = "x".join(str(int(s)) for s in img_size)
    return meta


def export_backbone(model: nn.Module, path: PathLike, *, keep_head: bool = False,
                    state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Save the backbone weights of a (possibly wrapped) timm model to ``path`` (.safetensors).

    The classifier (``pretrained_cfg['classifier']``) is dropped unless ``keep_head``. The file's
    metadata records architecture, in_chans, img_size, num_classes and num_features.
    ``state_dict``: an already gathered full state dict (FSDP2 / ZeRO-3:
    ``accelerator.get_state_dict(model)`` on rank 0) to write instead of ``model.state_dict()``.
    """
    heads = classifier_names(unwrap_model(model))
    return export_state_dict(
        model.state_dict() if state_dict is None else state_dict, path,
        drop_prefixes=() if keep_head else heads, metadata=backbone_metadata(model, keep_head=keep_head),
    )


def export_head(model: nn.Module, path: PathLike, *,
                state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Save only the classifier head of a (possibly wrapped) timm model to ``path``.

    Keys as the bare model names them (``head.weight``, ``head.bias``; ``fc.*`` for ResNets);
    metadata as :func:`export_backbone` with ``num_classes`` = the head's K. ``state_dict``: an
    already gathered full state dict, as for :func:`export_backbone`. A headless model raises.
    """
    heads = classifier_names(unwrap_model(model))
    clean = strip_wrapper_prefixes(model.state_dict() if state_dict is None else state_dict)
    kept = {k: v for k, v in clean.items() if _under(k, heads)}
    meta = backbone_metadata(model, keep_head=True)
    if not kept or meta["num_classes"] == "0":
        raise ValueError(f"export_head: {type(unwrap_model(model)).__name__} has no classifier head "
                         f"(looked for {list(heads)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_safetensors(path, _to_plain_cpu(kept), {"format": "pt", **meta})


def load_head_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a :func:`export_head` file, on CPU (no pickle)."""
    return load_file(str(path), device="cpu")


def load_backbone_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an export, on CPU (``safetensors.torch.load_file``: no pickle, no code run)."""
    return load_file(str(path), device="cpu")


def read_export_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty dict if none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def timm_pretrained_kwargs(path: PathLike) -> dict[str, Any]:
    """``timm.create_model`` kwargs that load the export at ``path`` (see module docstring).

    Extra ``num_classes``/``img_size``/``in_chans`` kwargs to create_model still win: a
    different num_classes gets a fresh head, a different img_size a resampled pos_embed.
    """
    meta = read_export_metadata(path)
    overlay: dict[str, Any] = {"file": str(path), "num_classes": int(meta.get("num_classes", 0))}
    if "in_chans" in meta and "img_size" in meta:  # timm's defaults for in_chans / img_size
        h, w = (int(s) for s in meta["img_size"].split("x"))
        overlay["input_size"] = (int(meta["in_chans"]), h, w)
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}


def _in_chans(model: nn.Module) -> int:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, str):
        weight = getattr(model.get_submodule(first), "weight", None)
        if weight is not None and weight.ndim == 4:
            return int(weight.shape[1] * getattr(model.get_submodule(first), "groups", 1))
    return int(getattr(model, "in_chans", 3))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
