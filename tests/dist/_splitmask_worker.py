"""Worker for tests/dist/test_splitmask_dist.py: one spawned gloo process of 2.

Runs, on this rank's share of fixed global batches: symmetric InfoNCE with equal (4 + 4) and
uneven (3 + 5) shares, and one SplitMask training step (8 images = 4 + 4); saves losses and
gradients to ``out_dir/rank{r}.pt`` for the test to compare with one process on the full batch.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

WORLD = 2
SPLITS = {"equal": (0, 4, 8), "uneven": (0, 3, 8)}  # row boundaries of rank 0 / rank 1


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def splitmask_method():
    """The same tiny SplitMask (identical weights) in every process."""
    import dist_ssl.methods  # noqa: F401
    from dist_ssl.config.schema import from_dict
    from dist_ssl.methods import MethodConfig, MethodContext, build_method
    from dist_ssl.models.config import ModelConfig

    torch.manual_seed(0)
    cfg = from_dict(MethodConfig, {"name": "splitmask", "vocab_size": 32, "mask_min_block": 4})
    ctx = MethodContext(model=ModelConfig(name="vit_pico_patch4_28", img_size=28, in_chans=1),
                        num_samples=100, num_classes=10, in_chans=1,
                        equal_rank_batches=True)  # 4 + 4 images, as the engine's loader guarantees
    return build_method(cfg, ctx)


def splitmask_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"views": [torch.randn(8, 1, 28, 28, generator=g)], "index": torch.arange(8) * 5 + 1,
            "label": torch.zeros(8, dtype=torch.long)}


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])


def run(rank: int, init_file: str, out_dir: str) -> None:
    from dist_ssl.losses.symmetric_info_nce import symmetric_info_nce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    z1, z2 = embeddings()
    for name, bounds in SPLITS.items():
        lo, hi = bounds[rank], bounds[rank + 1]
        a, b = z1[lo:hi].clone().requires_grad_(), z2[lo:hi].clone().requires_grad_()
        loss = symmetric_info_nce(a, b, tau=0.2)
        loss.backward()
        res[name] = {"loss": loss.detach(), "grad1": a.grad, "grad2": b.grad}
    method = splitmask_method()
    full = splitmask_batch()
    half = {k: (v[4 * rank:4 * rank + 4] if k != "views" else [v[0][4 * rank:4 * rank + 4]])
            for k, v in full.items()}
    out = method(half, step=5)
    out["loss"].backward()
    grads = flat_grads(method.student)
    dist.all_reduce(grads)  # what DDP does: mean of the ranks' gradients
    res["splitmask"] = {"loss": out["loss"].detach(), "grad": grads / WORLD,
                        "info_nce": out["logs"]["info_nce"]}
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
