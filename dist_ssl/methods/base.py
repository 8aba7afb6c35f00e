"""The one interface every pretext / training method implements.

A method is an ``nn.Module`` with its own typed config (a registered ``MethodConfig`` variant,
in ``methods/configs/``). The engine knows nothing else about it:

* ``student``: the module the optimizer trains under data parallelism. The engine wraps it
  (DDP / FSDP2 / DeepSpeed ZeRO) and assigns the wrapper back to ``method.student``, so the
  method must run every data-parallel computation through ``self.student(...)`` (one call per
  step: DDP and ZeRO hooks fire on the wrapper's forward).
* ``local_modules()``: trainable modules kept OUT of data-parallel gradient sync (e.g. a
  model-parallel classifier shard). The engine optimizes, checkpoints and re-shards them
  (``dist_ssl.parallel.rank_local``) but never wraps them.
* everything else (EMA teachers, queues, centers) is plain state in submodules/buffers, saved in
  checkpoints through ``extra_state_dict()``, updated in ``after_step()``.

Shape legend: [B, V, C, H, W] = batch, views, channels, height, width; [B, D] = features.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from dist_ssl.methods.configs.base import MethodConfig


@dataclass
class MethodContext:
    """Facts the engine knows at start-up and a method may need to build itself."""

    model: Any                      # the run's ModelConfig (backbone name, img size, ...)
    num_samples: int                # N training images (= instance classes for IDMM)
    num_classes: int                # semantic classes in the training manifest
    in_chans: int                   # channels the loader produces
    world_size: int = 1
    rank: int = 0
    total_steps: int = 1            # optimizer steps of the whole run, for schedules
    steps_per_epoch: int = 1
    output_dir: Optional[str] = None
    seed: int = 0                   # the run's seed (cfg.seed), for method-side randomness (masks)
    # True when every rank's forward batch has the same rows (the engine's train loader gives every
    # rank full batches of train.batch_size): global-batch losses then skip their size gathers
    equal_rank_batches: bool = False


class Method(nn.Module):
    """Base class; subclasses set ``config_class`` and are registered by name."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    student: nn.Module

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    # --- what the data must produce -----------------------------------------------------
    def train_views(self):
        """A ``dist_ssl.data.views.ViewSpec`` for the training loader."""
        raise NotImplementedError

    # --- one training step ----------------------------------------------------------------
    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """Return ``{"loss": scalar tensor, "logs": {name: float or 0-d detached tensor}}``."""
        raise NotImplementedError

    def local_modules(self) -> list[nn.Module]:
        """Trainable modules the engine optimizes but never wraps for gradient sync: ``ShardedLinear``
        shards, which carry their class range (``dist_ssl.parallel.rank_local``)."""
        return []

    def local_lr_scale(self) -> float:
        """Multiplier of the run's lr for the rank-local modules' optimizer (e.g. IDMM's
        instance classifier, whose rows see a gradient once per epoch)."""
        return 1.0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Post-optimizer-step updates (EMA teachers, queues, centers)."""

    def classify(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Class logits [B, K] for top-1/top-5 evaluation, or None when the method has no
        classifier over the semantic classes (then use k-NN / linear probe: tools/eval.py)."""
        return None

    # --- what leaves the run --------------------------------------------------------------
    # True when backbone() carries a semantic classifier head that the engine should export too
    # (head.safetensors beside backbone.safetensors), e.g. supervised fine-tuning, so a later
    # stage can continue with it (method.init_head).
    exports_head: ClassVar[bool] = False

    def backbone(self) -> nn.Module:
        """The (unwrapped) backbone to export and evaluate."""
        raise NotImplementedError

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Method state outside ``student`` and the rank-local modules (teachers, queues,
        centers): the same on every rank, saved once."""
        skip = ("student.",) + tuple(f"{p}." for p in self.named_local_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def named_local_modules(self) -> dict[str, nn.Module]:
        """``local_modules()`` by their attribute path (the names in checkpoints)."""
        ids = {id(m) for m in self.local_modules()}
        return {name: m for name, m in self.named_modules() if id(m) in ids and name}

    def load_extra_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.extra_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"method state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)


class MethodState:
    """A method's ``extra_state_dict`` as one stateful object of the engine's checkpoint: the
    same on every rank, so rank 0 writes it (``per_rank`` False)."""

    per_rank: ClassVar[bool] = False

    def __init__(self, method: Method):
        self.method = method

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.method.extra_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.method.load_extra_state_dict(state)


def config_fields(cfg: MethodConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
