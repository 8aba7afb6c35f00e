"""Worker for tests/dist/test_t2t_cvt_dist.py, started by the real `accelerate launch` (2 processes).

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml tests/dist/_t2t_cvt_worker.py --out <result.json>

For T2T-ViT-pico and CvT-pico (10 classes, 28 px, 1 channel): a few AdamW steps of cross-entropy
on a fixed global batch split evenly over the ranks, next to the same training in one process on
the whole batch with plain BatchNorm. Two data-parallel paths share the one launch (each launch
costs ~35 s of CPU in process starts and imports): FSDP2 prepared by accelerate exactly as the
engine prepares a student (``fsdp_wrap_classes=Block``), and DDP -- torch's
``DistributedDataParallel`` with the defaults accelerate gives it on CPU (buffers broadcast, no
unused-parameter search). CvT's projection BatchNorms are swapped for GlobalBatchNorm first, as
engine/setup.py does. Rank 0 writes per-step losses, the max parameter and BN-statistic
differences to the reference, and the evidence of the wrapping.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ssl.models import ModelConfig, create_backbone
from dist_ssl.parallel import collectives as C
from dist_ssl.parallel.accelerator import (build_accelerator, describe,
                                           prepare_model_and_optimizer)
from dist_ssl.parallel.config import ParallelConfig
from dist_ssl.parallel.global_batchnorm import convert_to_global_batchnorm

GLOBAL_BATCH, STEPS = 8, 3
BACKBONES = ("t2t_vit_pico", "cvt_pico")


def make_model(name: str) -> torch.nn.Module:
    # the performers' fixed dropout 0.1 off: masks drawn per rank cannot match one process
    extra = {"t2t_drop_rate": 0.0} if name.startswith("t2t") else {}
    torch.manual_seed(0)  # identical init (and performer random features) everywhere
    return create_backbone(ModelConfig(name=name, in_chans=1, num_classes=10, extra=extra))


def make_opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps 1e-6: Adam's first step is lr * g / (|g| + eps), so a gradient that is zero up to
    # rounding (softmax is shift-invariant in the key bias) must not become +-lr by summation order
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, eps=1e-6)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


@functools.lru_cache(maxsize=None)  # one reference per backbone serves both paths
def reference(name: str) -> tuple[list[float], dict]:
    """One process, the whole batch, plain BatchNorm."""
    model = make_model(name)
    opt = make_opt(model)
    x, y = data()
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def train(acc, name: str, path: str) -> dict:
    model, n_bn = convert_to_global_batchnorm(make_model(name))  # as engine/setup.py does
    if path == "fsdp2":
        model, opt, _ = prepare_model_and_optimizer(acc, model, make_opt(model))
    else:
        model = DDP(model)
        opt = make_opt(model)
    params = list(model.parameters())
    evidence = {"wrapper": type(model).__name__, "n_params": len(params), "global_bn": n_bn,
                "dtensor_params": sum(type(p).__name__ == "DTensor" for p in params)}
    x, y = data()
    per, rank = GLOBAL_BATCH // acc.num_processes, acc.process_index
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        acc.backward(loss) if path == "fsdp2" else loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(C.all_reduce_mean(loss.detach()).item())  # even split: = the full-batch loss
    # gathered full tensors on rank 0 (a collective under FSDP2)
    state = acc.get_state_dict(model) if path == "fsdp2" else model.module.state_dict()
    if not acc.is_main_process:
        return {}
    ref_losses, ref_state = reference(name)
    init = make_model(name).state_dict()
    assert state.keys() == ref_state.keys(), sorted(set(state) ^ set(ref_state))
    diff = {k: (state[k].float() - ref_state[k].float()).abs().max().item() for k in ref_state}
    bn_stats = [k for k in diff if k.endswith(("running_mean", "running_var"))]
    return {"losses": losses, "reference": ref_losses, "sharding": evidence,
            "max_param_diff": max(v for k, v in diff.items() if k not in bn_stats and "num_batches" not in k),
            "max_bn_stat_diff": max((diff[k] for k in bn_stats), default=None), "n_bn_stats": len(bn_stats),
            "moved": max((state[k] - init[k]).abs().max().item() for k in dict(make_model(name).named_parameters()))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    acc = build_accelerator(ParallelConfig(backend="fsdp2", fsdp_wrap_classes="Block"))
    result = {"describe": describe(acc), "env_world_size": os.environ.get("WORLD_SIZE")}
    for path in ("ddp", "fsdp2"):
        for name in BACKBONES:
            result[f"{path}/{name}"] = train(acc, name, path)
    if acc.is_main_process:
        args.out.write_text(json.dumps(result, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()
