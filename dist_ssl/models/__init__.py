"""Backbones: timm factory (+ small-image ViTs, T2T-ViT and CvT registered with timm), pos-embed
resampling, backbone-only safetensors export (+ the classifier head on its own). Importing this
package registers those models."""
from .export import (
    HEAD_FILE,
    export_backbone,
    export_head,
    export_state_dict,
    load_backbone_file,
    load_head_file,
    read_export_metadata,
    strip_wrapper_prefixes,
    timm_pretrained_kwargs,
    unwrap_model,
)
from .factory import (
    BACKBONE_ALIASES,
    ModelConfig,
    TokenOutput,
    available_backbones,
    classifier_names,
    create_backbone,
    feature_dim,
    forward_tokens,
    resolve_backbone_name,
)
from .pos_embed import LoadReport, load_backbone_state, resample_pos_embed
from .small_vit import SMALL_VIT_ARGS, small_vit_names

__all__ = [
    "BACKBONE_ALIASES",
    "HEAD_FILE",
    "LoadReport",
    "ModelConfig",
    "SMALL_VIT_ARGS",
    "TokenOutput",
    "available_backbones",
    "classifier_names",
    "create_backbone",
    "export_backbone",
    "export_head",
    "export_state_dict",
    "feature_dim",
    "forward_tokens",
    "load_backbone_file",
    "load_backbone_state",
    "load_head_file",
    "read_export_metadata",
    "resample_pos_embed",
    "small_vit_names",
    "strip_wrapper_prefixes",
    "timm_pretrained_kwargs",
    "unwrap_model",
]
