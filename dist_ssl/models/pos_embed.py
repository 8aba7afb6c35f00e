"""Absolute position-embedding resampling and resolution-changing backbone loading.

Shapes: pos_embed [1, P + h*w, D] (P prefix tokens — cls, registers — that have their own
embedding unless the model sets ``no_embed_class``; h*w patch-grid tokens; D dim).

Typical use: pre-train at 112 px, fine-tune at 224 px, evaluate at 448 px, or load a 28 px
export into a 56 px model. Patch-grid embeddings are interpolated as a 2-D image (bicubic,
antialias, as in timm / DeiT); prefix-token embeddings are copied unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .export import _under, strip_wrapper_prefixes
from .factory import classifier_names

__all__ = ["LoadReport", "load_backbone_state", "resample_pos_embed"]

logger = logging.getLogger(__name__)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    *,
    num_prefix_tokens: int = 1,
    old_grid: Optional[Sequence[int]] = None,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """[1, P + h*w, D] -> [1, P + new_h*new_w, D]; ``old_grid`` defaults to a square grid.

    A constant embedding stays constant. A linear ramp stays linear away from the outermost
    cells (``F.interpolate`` clamps at borders); this needs ``antialias=True``, which in PyTorch
    also selects the a=-0.5 cubic that reproduces linear ramps (the a=-0.75 default does not).
    """
    if pos_embed.ndim != 3:
        raise ValueError(f"pos_embed: expected [1, N, D], got {tuple(pos_embed.shape)}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(num_grid**0.5))
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(
            f"pos_embed: {num_grid} grid tokens (after {num_prefix_tokens} prefix) "
            f"do not form the grid {tuple(old_grid)}"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation=interpolation,
        antialias=True,  # only matters when shrinking; avoids aliasing a fine grid
    )


@dataclass
class LoadReport:
    """What :func:`load_backbone_state` did."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacked
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model lacks
    head_dropped: list[str] = field(default_factory=list)  # checkpoint classifier keys ignored
    head_loaded: list[str] = field(default_factory=list)  # checkpoint classifier keys loaded (keep_head)
    head_reinitialized: list[str] = field(default_factory=list)  # model head modules reset
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def load_backbone_state(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict_backbone: bool = True,
    keep_head: bool = False,
) -> LoadReport:
    """Load pre-trained backbone weights into ``model``, whose resolution may differ.

    - wrapper prefixes (``module.``, ``_orig_mod.``, FSDP1) are stripped;
    - ``pos_embed`` is resampled to the model's patch grid (ViT-style models);
    - classifier keys (``pretrained_cfg['classifier']``: ``head``, ``fc``, ``head.fc``) are
      dropped and the model's head re-initialised, unless ``keep_head`` and shapes match;
    - any other shape mismatch raises ``ValueError`` naming every key and both shapes;
    - with ``strict_backbone`` missing or unexpected non-head keys raise ``ValueError``.
    """
    sd = strip_wrapper_prefixes(state_dict)
    target = model.state_dict()
    heads = classifier_names(model)
    report = LoadReport()
    for key in [k for k in sd if _under(k, heads)]:
        if not keep_head or key not in target or sd[key].shape != target[key].shape:
            report.head_dropped.append(key)
            del sd[key]
    report.head_loaded = [k for k in sd if _under(k, heads)]
    _resample_into(model, sd, target, report)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if mismatched:
        raise ValueError("load_backbone_state: shape mismatch: " + "; ".join(mismatched))
    result = model.load_state_dict(sd, strict=False)
    report.missing = [k for k in result.missing_keys if not _under(k, heads)]
    report.unexpected = list(result.unexpected_keys)
    if strict_backbone and (report.missing or report.unexpected):
        raise ValueError(
            f"load_backbone_state: missing keys {report.missing}, unexpected keys {report.unexpected}"
        )
    head_missing = [k for k in result.missing_keys if _under(k, heads)]
    if head_missing or not keep_head:
        report.head_reinitialized = _reset_heads(model, heads)
    logger.info(
        "loaded backbone: %d tensors, resampled %s, head %s",
        len(sd), list(report.resampled),
        f"kept {report.head_loaded}" if report.head_loaded else f"re-initialised (dropped {report.head_dropped})",
    )
    return report


def _resample_into(
    model: nn.Module, sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Resample ``sd['pos_embed']`` in place to the model's grid (ViT / DeiT layout)."""
    key = "pos_embed"
    if key not in sd or key not in target or sd[key].shape == target[key].shape:
        return
    old, new = sd[key], target[key]
    if not hasattr(model, "patch_embed") or old.ndim != 3 or new.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return  # not a [1, N, D] embedding of the same dim: reported as a shape mismatch
    # With no_embed_class the prefix tokens carry no position embedding.
    num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    new_grid = tuple(model.patch_embed.grid_size)
    try:
        sd[key] = resample_pos_embed(old, new_grid, num_prefix_tokens=num_prefix).to(new.dtype)
    except ValueError as err:
        raise ValueError(f"load_backbone_state: cannot resample {key} {tuple(old.shape)}: {err}") from err
    report.resampled[key] = (tuple(old.shape), tuple(new.shape))


def _reset_heads(model: nn.Module, heads: tuple[str, ...]) -> list[str]:
    # Reset in place (reset_parameters) rather than replacing modules, so parameter identity
    # — and any optimizer / FSDP wrapping built from it — survives.
    done = []
    for name in heads:
        head = model.get_submodule(name)
        for sub_name, module in head.named_modules():
            if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
                module.reset_parameters()
                done.append(f"{name}.{sub_name}" if sub_name else name)
    return done
