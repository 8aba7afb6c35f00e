"""Exponential moving average of a model's weights (the functional update: ``methods/momentum.py``).

``ema = decay * ema + (1 - decay) * source`` for parameters; buffers (BatchNorm stats,
DINO centers kept as buffers, ...) are copied, since averaging running statistics is not
meaningful and copying keeps them consistent with the weights they normalise.

Sharded training: ``ModelEMA.update`` reads the *unwrapped* module (DDP / DataParallel
``.module``, DeepSpeed's engine, ``torch.compile``'s ``_orig_mod``; a model compiled in place by
``parallel.compile`` is read as is, and its copy here is eager). For FSDP2 the EMA must be constructed from
the model *before* ``fully_shard`` / ``accelerator.prepare`` (FSDP2 modules refuse deepcopy);
afterwards DTensor parameters are gathered one at a time with ``full_tensor()`` — a
collective, so every rank must call ``update`` — and the EMA holds full, unsharded weights on
every rank (memory: one extra full model per rank, optionally on CPU via ``device``).
DeepSpeed ZeRO-3 parameters (partitioned in place) are gathered for the update with
``deepspeed.zero.GatheredParameters`` (``dist_ssl.parallel.full_params``; also a collective).
Checked in 2-process runs of every backend (tests/dist/test_backends.py).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
from torch import nn

from dist_ssl.methods.momentum import ema_update_
from dist_ssl.models.export import unwrap_model
from dist_ssl.parallel.full_params import full_parameters

__all__ = ["ModelEMA", "unwrap_model"]


class ModelEMA:
    """EMA copy of a model's weights (timm ``ModelEmaV2``/MoCo-style), kept outside the model.

    Args:
        model: the live model (may be DDP-wrapped); a deep copy is taken at construction.
        decay: target decay per update, e.g. 0.9999.
        warmup: if True, the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n
            updates, so early EMA weights track the fast-changing model (timm/TF convention).
        device: where the EMA lives (e.g. ``"cpu"`` to save accelerator memory); default: as source.

    Not an ``nn.Module`` on purpose: DDP/FSDP must not wrap or sync it, and the optimizer must
    not see it. It has ``state_dict``/``load_state_dict`` so ``accelerator.register_for_checkpointing``
    saves it.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False,
                 device: Optional[torch.device | str] = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: must be in [0, 1], got {decay}")
        src = unwrap_model(model)
        if any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in src.parameters()):
            # FSDP2 modules refuse deepcopy and ZeRO-3 partitions are empty placeholders.
            raise ValueError("ModelEMA: build the EMA from the model before sharding it "
                             "(before fully_shard / accelerator.prepare)")
        self.module = copy.deepcopy(src).eval()
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (wrapped or not) into the average."""
        src = unwrap_model(model)
        decay = self.current_decay()
        ema_p, src_p = list(self.module.parameters()), list(src.parameters())
        if len(ema_p) != len(src_p):
            raise ValueError(f"ModelEMA.update: model has {len(src_p)} params, EMA has {len(ema_p)}")
        with full_parameters(src_p) as full:
            ema_update_(ema_p, full, decay)
        self._copy_all(self.module.buffers(), src.buffers())
        self.num_updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s weights into the EMA (e.g. after loading a pretrained checkpoint)."""
        src = unwrap_model(model)
        self._copy_all(self.module.parameters(), src.parameters())
        self._copy_all(self.module.buffers(), src.buffers())

    @staticmethod
    def _copy_all(dst: Iterable[torch.Tensor], src: Iterable[torch.Tensor]) -> None:
        dst, src = list(dst), list(src)
        if len(dst) != len(src):
            raise ValueError(f"ModelEMA: {len(src)} source tensors vs {len(dst)} EMA tensors")
        with full_parameters(src) as full:
            for d, s in zip(dst, full):
                d.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay,
                "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
