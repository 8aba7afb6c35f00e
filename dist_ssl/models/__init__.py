"""Backbones: timm factory (+ small-image ViTs, T2T-ViT and CvT registered with timm), pos-embed
resampling, backbone-only safetensors export (+ the classifier head on its own).

Importing this package imports nothing heavy: ``ModelConfig`` (config.py) and the backbone names
(names.py) are torch-free, so the run config can use them. Every other name below is imported
from its module on first use; ``import dist_ssl.models.factory`` registers the small ViTs, T2T-ViT
and CvT with timm.
"""
from __future__ import annotations

import importlib

from .config import ModelConfig
from .names import BACKBONE_ALIASES, available_backbones, resolve_backbone_name

# name -> the module that defines it (imported on first access: each imports torch and timm)
_LAZY = {
    **dict.fromkeys(("HEAD_FILE", "export_backbone", "export_head", "export_state_dict", "load_backbone_file",
                     "load_head_file", "read_export_metadata", "strip_wrapper_prefixes",
                     "timm_pretrained_kwargs", "unwrap_model"), "export"),
    **dict.fromkeys(("TokenOutput", "classifier_names", "create_backbone", "feature_dim", "forward_tokens"),
                    "factory"),
    **dict.fromkeys(("LoadReport", "load_backbone_state", "resample_pos_embed"), "pos_embed"),
    **dict.fromkeys(("SMALL_VIT_ARGS", "small_vit_names"), "small_vit"),
}

__all__ = sorted(["BACKBONE_ALIASES", "ModelConfig", "available_backbones", "resolve_backbone_name", *_LAZY])


def __getattr__(name: str):
    if name in _LAZY:
        importlib.import_module(f"{__name__}.factory")  # every backbone use needs the timm registrations
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
