"""Everything a run needs before its first step, built from the resolved config.

The engine never looks at method names: it asks the method for its views, its data-parallel
``student`` and its rank-local modules, and builds the rest from the config sections.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.loader import TrainLoader, build_eval_loader, build_train_loader
from dist_ssl.data.manifest import load_manifest
from dist_ssl.engine.ema import ModelEMA
from dist_ssl.engine.optim import absolute_lr, build_optimizer, param_groups, resolve_warmup_steps
from dist_ssl.engine.schedules import build_lr_scheduler
from dist_ssl.methods import Method, MethodContext, build_method
from dist_ssl.parallel.accelerator import build_accelerator, prepare_model_and_optimizer
from dist_ssl.parallel.global_batchnorm import convert_to_global_batchnorm
from dist_ssl.parallel.rank_local import RankLocalState

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    accelerator: Accelerator
    method: Method
    loader: TrainLoader
    eval_loader: Optional[Any]
    optimizer: Any
    scheduler: Any
    rank_local: Optional[RankLocalState]  # the method's rank-local modules + their optimizer (never prepared)
    ema: Optional[ModelEMA]
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    lr: float
    input_dtype: Optional[torch.dtype]  # DeepSpeed bf16/fp16 wants inputs cast by us


def _lr_schedule(optimizer, cfg, total_steps: int, warmup: int, lr: float):
    return build_lr_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup, lr=lr,
                              min_lr=cfg.optim.min_lr, start_warmup_lr=cfg.optim.start_warmup_lr,
                              kind=cfg.optim.schedule)


def build_run(cfg) -> RunParts:
    if not cfg.data.train:  # optional in the schema (configs are also loaded to be printed)
        raise ConfigError("data.train", "required to train: a shard directory made by "
                          "tools/make_shards.py (set data.train=DIR)")
    accelerator = build_accelerator(cfg.parallel, gradient_clipping=cfg.optim.clip_grad,
                                    train_micro_batch_size=cfg.train.batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    manifest = load_manifest(cfg.data.train)
    accum = cfg.parallel.grad_accum_steps
    set_seed(cfg.seed)  # identical initial weights on every rank, whatever the world size
    # equal_rank_batches: the train stream plan pads (drop_last=False) or drops (True) the epoch's
    # tail so every rank gets full batches of train.batch_size; the losses then skip a size gather
    ctx = MethodContext(model=copy.deepcopy(cfg.model), num_samples=manifest.num_samples,
                        num_classes=manifest.num_classes, in_chans=cfg.model.in_chans,
                        world_size=world, rank=rank, output_dir=cfg.output_dir, seed=cfg.seed,
                        equal_rank_batches=True)
    method = build_method(cfg.method, ctx)
    if world > 1 and cfg.parallel.global_batchnorm:  # before the optimizer, EMA and DP wrapping see it
        _, n_bn = convert_to_global_batchnorm(method)
        if n_bn:
            log.info("%d BatchNorm layers normalise over the global batch (parallel.global_batchnorm)", n_bn)
    # uint8 views (pinned on CUDA), normalised on the device by TrainLoader.to_device
    views = dataclasses.replace(method.train_views(), blur_sigma_scale=cfg.data.blur_sigma_scale)
    loader = build_train_loader(cfg.data.train, views, cfg.train.batch_size,
                                rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                seed=cfg.seed, drop_last=cfg.data.drop_last, uint8_views=True,
                                pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda",
                                non_blocking=cfg.data.non_blocking,
                                reduced_decode=cfg.data.reduced_decode, decode=cfg.data.decode)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size: {len(loader)} batches per epoch per rank is fewer than "
                         f"parallel.grad_accum_steps={accum}; lower the batch size")
    total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    ctx.total_steps, ctx.steps_per_epoch = total_steps, steps_per_epoch
    global_batch = cfg.train.batch_size * world * accum
    lr = absolute_lr(cfg.optim, global_batch)
    warmup = resolve_warmup_steps(cfg.optim, steps_per_epoch)
    if warmup > total_steps:
        log.warning("warmup of %d steps is longer than the run (%d steps); warming up over the whole run",
                    warmup, total_steps)
        warmup = total_steps
    log.info("global batch %d = %d per process x %d processes x %d accumulation; lr %.3g "
             "(base_lr %.3g x %d / 256); %d steps (%d per epoch), warmup %d",
             global_batch, cfg.train.batch_size, world, accum, lr, cfg.optim.base_lr,
             global_batch, total_steps, steps_per_epoch, warmup)

    method.to(accelerator.device)
    ema = ModelEMA(method.student, cfg.train.ema_decay) if cfg.train.ema_decay else None
    groups = param_groups(method.student, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay,
                          extra_no_decay=cfg.optim.extra_no_decay)
    optimizer = build_optimizer(cfg.optim, groups, lr)
    scheduler = _lr_schedule(optimizer, cfg, total_steps, warmup, lr)
    student, optimizer, scheduler = prepare_model_and_optimizer(accelerator, method.student,
                                                                optimizer, scheduler, cfg=cfg.parallel)
    method.student = student
    rank_local = _rank_local_state(method, cfg, total_steps, warmup, lr)

    eval_loader = None
    if cfg.data.val:
        size = method.train_views().groups[0].size
        eval_loader = build_eval_loader(cfg.data.val, size, cfg.train.batch_size, rank=rank,
                                        world_size=world, num_workers=cfg.data.num_workers,
                                        in_chans=cfg.model.in_chans)
    input_dtype = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    set_seed(cfg.seed + rank, device_specific=False)  # per-rank streams for dropout / mixing
    return RunParts(accelerator, method, loader, eval_loader, optimizer, scheduler, rank_local, ema,
                    steps_per_epoch, total_steps, global_batch, lr, input_dtype)


def _rank_local_state(method: Method, cfg, total_steps: int, warmup: int, lr: float) -> Optional[RankLocalState]:
    """The method's trainable rank-local modules with their own optimizer and lr schedule (at
    ``method.local_lr_scale()`` x the run's lr); None when it has none."""
    modules = method.named_local_modules()
    if not any(p.requires_grad for m in modules.values() for p in m.parameters()):
        return None
    scale = method.local_lr_scale()
    groups = [{**g, "lr_scale": g["lr_scale"] * scale} for m in modules.values()
              for g in param_groups(m, cfg.optim.weight_decay)]
    if scale != 1.0:
        log.info("rank-local modules train at %g x the lr", scale)
    optimizer = build_optimizer(cfg.optim, groups, lr)
    return RankLocalState(modules, optimizer, _lr_schedule(optimizer, cfg, total_steps, warmup, lr))


def run_name(cfg) -> str:
    return os.path.basename(os.path.normpath(cfg.output_dir))

