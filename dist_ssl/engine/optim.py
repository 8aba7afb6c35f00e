"""Optimizer construction: absolute lr, parameter groups, layer-wise lr decay.

Optimizers (``optim.name``): AdamW (decoupled weight decay; the ViT default) and SGD with
momentum (weight decay as an L2 term added to the gradient, ``torch.optim.SGD``; the IDMM
paper's MoCo v2 / SimCLR / SupCon baselines, Table 10). Both get the same parameter groups,
weight-decay rule, layer decay and lr / weight-decay schedules.

Weight-decay rule (MAE/DINO/timm convention): no decay on 1-d parameters (norm weights and
biases, LayerScale gammas), on any ``*.bias``, and on the learned tokens and position
embeddings (cls/dist/register/mask tokens, ``pos_embed``), which are 3-d and so escape the
ndim rule. Those names come from every submodule's timm ``no_weight_decay()`` (so a method that
wraps a timm backbone as ``backbone`` still finds ``backbone.cls_token``) plus a fixed list of
leaf names, plus caller-supplied glob patterns.

Layer-wise lr decay (BEiT, Bao et al. 2021; MAE fine-tuning, He et al. 2021) for a ViT trunk
of depth L: stem (patch_embed, tokens, pos_embed) = layer 0, ``blocks.i`` = i+1, everything
else (final norm, fc_norm, head) = L+1; ``lr_scale = layer_decay ** (L + 1 - layer_id)``.
timm's ``param_groups_layer_decay`` is not used because its ``group_matcher`` puts the final
``norm`` in the last block's layer (not the head's, as MAE/BEiT do) and it only sees the
top-level module, not a backbone nested inside a method.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from typing import Iterable, Optional

import torch
from torch import nn

from dist_ssl.engine.optim_config import OptimConfig

logger = logging.getLogger(__name__)

# Leaf parameter names that never get weight decay even though they are >1-d.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = (
    "cls_token", "dist_token", "reg_token", "register_tokens", "mask_token",
    "pos_embed", "absolute_pos_embed", "relative_position_bias_table",
)
# Leaf module/parameter names that belong to layer 0 (the stem) under layer decay.
_STEM_NAMES = DEFAULT_NO_DECAY_NAMES[:6] + ("patch_embed", "norm_pre")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_STEM_RE = re.compile(r"(?:^|\.)(?:" + "|".join(_STEM_NAMES) + r")(?:\.|$)")


def absolute_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr * global_batch / 256`` unless ``lr`` is set."""
    if cfg.lr is not None:
        return float(cfg.lr)
    if global_batch <= 0:
        raise ValueError(f"global_batch: must be > 0, got {global_batch}")
    return cfg.base_lr * global_batch / 256.0


def resolve_warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps from whichever of warmup_steps / warmup_epochs is set."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    if cfg.warmup_epochs is not None:
        return int(round(cfg.warmup_epochs * steps_per_epoch))
    return 0


def _model_no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names listed by any submodule's timm-style ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer index of a ViT parameter for layer decay: stem 0, ``blocks.i`` i+1, rest num_layers+1."""
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if _STEM_RE.search(name):
        return 0
    return num_layers + 1


def _num_vit_layers(names: Iterable[str]) -> int:
    ids = {int(m.group(1)) for n in names if (m := _BLOCK_RE.search(n))}
    return max(ids) + 1 if ids else 0


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: Optional[float] = None,
    no_decay_names: Iterable[str] = DEFAULT_NO_DECAY_NAMES,
    extra_no_decay: Iterable[str] = (),
) -> list[dict]:
    """Parameter groups (any optimizer); each has ``params``, ``weight_decay``, ``lr_scale``, ``group_name``.

    Frozen parameters (``requires_grad=False``) are left out. ``no_decay_names`` match leaf names
    (the last dotted component); ``extra_no_decay`` are globs matched against full names.
    ``lr_scale`` is 1.0 unless ``layer_decay`` is given (see module docstring).
    """
    model_nd = _model_no_decay_names(model)
    leaf_nd = set(no_decay_names)
    globs = tuple(extra_no_decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth = _num_vit_layers(n for n, _ in named)
    if layer_decay is not None and depth == 0:
        logger.warning("layer_decay=%s has no effect: no 'blocks.<i>' parameters found", layer_decay)

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        no_decay = (
            p.ndim <= 1 or name.endswith(".bias") or name in model_nd
            or name.rsplit(".", 1)[-1] in leaf_nd
            or any(fnmatch.fnmatchcase(name, g) for g in globs)
        )
        layer = vit_layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        key = (layer, not no_decay)
        if key not in groups:
            groups[key] = {
                "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                "group_name": f"layer_{layer}_{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(p)
    # Sorted so the group order (and so optimizer state_dict layout) is deterministic.
    return [groups[k] for k in sorted(groups)]


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the weight decay of every decayed group (``param_groups``' "..._decay" groups; the
    no-decay groups stay at 0). Works through accelerate's and DeepSpeed's optimizer wrappers,
    which keep the torch optimizer's group dicts."""
    for g in optimizer.param_groups:
        if not g.get("group_name", "").endswith("no_decay"):
            g["weight_decay"] = value


def build_optimizer(cfg: OptimConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` (AdamW or SGD) over ``groups``; each group's starting lr is ``lr * lr_scale``.

    The scheduler (``schedules.build_lr_scheduler``) multiplies these per-group lrs, so the
    layer-decay scale survives every schedule step and a checkpoint round trip. Each group
    carries its own weight decay (0 for the no-decay groups), so the constructor's default
    is never used for a grouped parameter.
    """
    prepared = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    # foreach=None lets torch pick the multi-tensor kernel where the device supports it.
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(prepared, lr=lr, momentum=cfg.momentum,
                                                     nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(prepared, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    logger.info("optimizer %s over %d parameter groups (%d tensors), lr %.3g%s", type(opt).__name__,
                len(prepared), sum(len(g["params"]) for g in prepared), lr,
                f", momentum {cfg.momentum}, nesterov {cfg.nesterov}" if cfg.name == "sgd" else "")
    return opt

