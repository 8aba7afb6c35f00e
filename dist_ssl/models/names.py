"""The backbone names a recipe may give as ``model.name``, resolved to timm architecture names.

Plain strings, no timm: the run config validates ``model.name`` against this table without
importing timm or torch. Only a name outside the table (any other timm model) asks timm's
registry, which imports both.
"""
from __future__ import annotations

import difflib

__all__ = ["BACKBONE_ALIASES", "OWN_BACKBONES", "available_backbones", "resolve_backbone_name"]

# The models this package registers with timm (small_vit.py, t2t_vit.py, cvt.py), by name. Written
# out here because reading them from those modules would import timm; tests/unit/test_models.py
# checks the list against what they register.
OWN_BACKBONES: tuple[str, ...] = (
    "vit_pico_patch4_28", "vit_nano_patch4_28", "vit_nano_patch4_32",  # small_vit.SMALL_VIT_ARGS
    "t2t_vit_7", "t2t_vit_14", "t2t_vit_pico_28",  # t2t_vit.T2T_VIT_NAMES
    "cvt_13", "cvt_pico_28",  # cvt.CVT_NAMES
)

# Short names used in recipes -> timm architecture names. Any other timm name is accepted too.
BACKBONE_ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "pvt_v2_b0": "pvt_v2_b0",
    "pvt_v2_b1": "pvt_v2_b1",
    "pvt_v2_b2": "pvt_v2_b2",
    "pvt_v2_b3": "pvt_v2_b3",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "resnet50": "resnet50",
    "vit_pico": "vit_pico_patch4_28",
    "vit_nano": "vit_nano_patch4_28",
    **{name: name for name in OWN_BACKBONES[:3]},
    # T2T-ViT (Yuan et al. 2021) and CvT (Wu et al. 2021): dist_ssl.models.t2t_vit / cvt
    "t2t_vit_pico": "t2t_vit_pico_28",
    "cvt_pico": "cvt_pico_28",
    **{name: name for name in OWN_BACKBONES[3:]},
}


def available_backbones() -> list[str]:
    """Short names the factory knows (every timm name works as well)."""
    return sorted(BACKBONE_ALIASES)


def resolve_backbone_name(name: str) -> str:
    """Alias or timm name -> timm name; ValueError naming the nearest valid names otherwise."""
    if name in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name]
    import timm  # only for a name outside the table: timm's registry (imports torch, ~2 s)

    if timm.is_model(name):
        return name
    near = difflib.get_close_matches(name, list(BACKBONE_ALIASES) + timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"name: unknown backbone {name!r}{hint}")
