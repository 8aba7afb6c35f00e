"""Worker for tests/dist/test_compile_dist.py, started by the real `accelerate launch` (2 CPU processes).

    accelerate launch --config_file recipes/accelerate/<x>.yaml tests/dist/_compile_worker.py \
        --backend <b> --compile-backend aot_eager --out <result.json>

Trains a tiny timm ViT (vit_pico, 28 px) for a few AdamW steps on a fixed global batch split
over the ranks, with ``parallel.compile`` on, next to an in-process single-process EAGER
reference on the full batch; records what proves the compile happened (dynamo graphs, DDP's
bucketed graph split) and that the state-dict keys are the eager model's. Rank 0 writes --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import timm
import torch
from torch import nn

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.parallel import collectives as C
from dist_ssl.parallel.accelerator import build_accelerator, describe, prepare_model_and_optimizer
from dist_ssl.parallel.config import ParallelConfig
from dist_ssl.parallel.compile import is_compiled

from _worker_common import full_batch_losses, leave_launch  # the script's folder is on sys.path

GLOBAL_BATCH, STEPS, CLASSES = 8, 3, 4


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical init on every rank and in the reference
    return timm.create_model("vit_pico_patch4_28", pretrained=False, in_chans=1, num_classes=CLASSES,
                             drop_rate=0.0, drop_path_rate=0.0)


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def reference_losses() -> list[float]:
    model = make_model()
    return list(full_batch_losses(model, make_opt(model), nn.functional.cross_entropy, *data(), STEPS))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--compile-backend", default="aot_eager")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ddp_log = logging.getLogger("torch._dynamo.backends.distributed")
    ddp_lines = _Lines()
    ddp_log.addHandler(ddp_lines)
    ddp_log.setLevel(logging.INFO)

    cfg = ParallelConfig(backend=args.backend, compile=True, compile_backend=args.compile_backend,
                         fsdp_wrap_classes="Block" if args.backend == "fsdp2" else "")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    acc = build_accelerator(cfg, train_micro_batch_size=GLOBAL_BATCH // world)
    rank = acc.process_index
    model = make_model()
    eager_keys = sorted(model.state_dict())
    model, opt, _ = prepare_model_and_optimizer(acc, model, make_opt(model), cfg=cfg)
    x, y = data()
    per = GLOBAL_BATCH // world
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    from torch._dynamo.utils import counters

    losses = []
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x.to(acc.device)), y.to(acc.device))
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(C.all_reduce_mean(loss.detach()).item())  # even split: mean of rank means
    inner = getattr(model, "module", model)
    result = {
        "describe": describe(acc),
        "wrapper": type(model).__name__,
        "compiled": is_compiled(model),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "ddp_optimizer_lines": [s for s in ddp_lines.lines if "DDPOptimizer" in s],
        "keys_unchanged": sorted(k.removeprefix("module.") for k in model.state_dict()) == eager_keys
        if args.backend != "fsdp2" else sorted(inner.state_dict()) == eager_keys,
        "losses": losses,
        "reference": reference_losses(),
    }
    if acc.is_main_process:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    leave_launch(acc)


if __name__ == "__main__":
    main()
