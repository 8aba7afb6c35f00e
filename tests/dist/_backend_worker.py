"""Worker for tests/dist/test_backends.py, started by the real `accelerate launch` (2 processes).

    accelerate launch --config_file recipes/accelerate/<x>.yaml tests/dist/_backend_worker.py \
        --backend <b> --out <result.json> --run-dir <dir>

Trains a small MLP on a fixed global batch split evenly over the ranks, next to an in-process
single-process reference on the full batch, updates a momentum teacher and a ModelEMA from the
(sharded) model, then round-trips a checkpoint through CheckpointManager and resumes one step. Rank 0 writes everything the test asserts on to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dist_ssl.engine.checkpoint import CheckpointError, CheckpointManager
from dist_ssl.engine.ema import ModelEMA
from dist_ssl.engine.optim import set_weight_decay
from dist_ssl.methods.momentum import momentum_update_
from dist_ssl.parallel import collectives as C
from dist_ssl.parallel.accelerator import (
    build_accelerator,
    describe,
    launcher_backend,
    prepare_model_and_optimizer,
)
from dist_ssl.parallel.config import ParallelConfig

from _worker_common import full_batch_losses, leave_launch  # the script's folder is on sys.path

GLOBAL_BATCH, DIM, STEPS = 16, 8, 4  # STEPS before the checkpoint; one more step after resume


class Block(nn.Module):
    """Residual MLP block; FSDP2 shards each one as its own unit (fsdp_wrap_classes=Block)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(torch.tanh(self.norm(x)))


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical init on every rank and in the reference
    return nn.Sequential(nn.Linear(DIM, 16), Block(16), Block(16), nn.Linear(16, 4))


def make_opt(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, DIM, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


TEACHER_M = 0.75


def reference_losses(n: int, teacher_after: int | None = None) -> tuple[list[float], dict | None]:
    """The same training, one process, full batch, plain torch; with ``teacher_after`` also the
    teacher state m * init + (1 - m) * params after that many steps."""
    model = make_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = None
    opt, sched = make_opt(model)
    out = []
    for loss in full_batch_losses(model, opt, nn.functional.mse_loss, *data(), n, sched):
        out.append(loss)
        if len(out) == teacher_after:
            teacher = {k: TEACHER_M * init[k] + (1 - TEACHER_M) * v for k, v in model.state_dict().items()}
    return out, teacher


def teacher_error(teacher: nn.Module, ema: ModelEMA, ref: dict) -> dict:
    """Max abs difference of the momentum teacher and the EMA (decay m, one update) to the reference."""
    return {name: max((p - ref[k]).abs().max().item() for k, p in mod.state_dict().items())
            for name, mod in (("teacher", teacher), ("ema", ema.module))}


def train_step(acc, model, opt, sched, x, y) -> float:
    loss = nn.functional.mse_loss(model(x), y)
    acc.backward(loss)
    opt.step()
    sched.step()
    opt.zero_grad()
    return C.all_reduce_mean(loss).item()  # even split -> mean of rank means = full-batch loss


def param_digest(acc, model) -> str | None:
    """sha256 of the full (gathered) fp32 parameters on rank 0; collective for FSDP2/ZeRO-3."""
    sd = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sharding_evidence(model) -> dict:
    """What the prepared model really is: accelerate falls back silently, so look at the parameters."""
    params = list(model.parameters())
    return {
        "wrapper": type(model).__name__,
        "dtensor_params": sum(type(p).__name__ == "DTensor" for p in params),
        "zero_stage": model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None,
        "zero3_partitioned_params": sum(hasattr(p, "ds_numel") and p.numel() == 0 for p in params),
        "n_params": len(params),
    }


def weight_decay_reaches_adamw(opt, model) -> list[list[float]]:
    """The trainer's weight-decay schedule sets the wrapped optimizer's groups; check that the
    torch AdamW doing the update (under accelerate's and DeepSpeed's wrappers) sees the values."""
    inner = []
    for root in (opt, getattr(model, "optimizer", None)):  # DeepSpeedEngine.optimizer: the ZeRO optimizer
        o = root
        while o is not None and not isinstance(o, torch.optim.AdamW):
            o = getattr(o, "optimizer", None)
        if o is not None:
            inner.append(o)
    seen = []
    for value in (0.123, 0.05):  # 0.05: back to make_opt's value before training
        set_weight_decay(opt, value)
        seen.append([g["weight_decay"] for o in inner for g in o.param_groups])
    return seen


def collective_checks(rank: int, world: int) -> dict:
    """2-process checks of dist_ssl.parallel.collectives against single-process math."""
    res = {"rank": C.get_rank(), "world": C.get_world_size()}
    res["mean"] = C.all_reduce_mean(torch.tensor([float(rank + 1)])).item()  # (1 + 2) / 2
    local = torch.arange(rank + 2, dtype=torch.float32).unsqueeze(1) + 10 * rank  # uneven: 2 and 3 rows
    res["gather_cat"] = C.all_gather_cat(local).squeeze(1).tolist()
    # all_gather_with_grad: loss_r = sum(w_r * gathered**2); the gradient each rank gets for its rows
    # must equal d(sum_r loss_r)/d(its rows) computed in one process.
    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 3, generator=g)
    w = torch.randn(world, 5, 3, generator=g)
    rows = [slice(0, 2), slice(2, 5)][rank]
    mine = full[rows].clone().requires_grad_(True)
    (w[rank] * C.all_gather_with_grad(mine) ** 2).sum().backward()
    ref = full.clone().requires_grad_(True)
    sum((w[r] * ref**2).sum() for r in range(world)).backward()
    res["grad_max_err"] = max(C.all_gather_object((mine.grad - ref.grad[rows]).abs().max().item()))
    res["broadcast"] = C.broadcast_object({"from": rank})
    res["gather_object"] = C.all_gather_object(rank * 10)
    C.barrier()
    return res


SHARD_OF_RANK_1 = {  # a file only rank 1 reads (or, for DDP, the shared weights file)
    "ddp": "model.safetensors",
    "fsdp2": "pytorch_model_fsdp_0/__1_0.distcp",
    "zero1": "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "zero2": "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "zero3": "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt",
}


def corrupt_copy_fails_everywhere(acc, cm, path: Path, root: Path, backend: str) -> list:
    """Truncate one shard in a copy of the checkpoint: every rank must raise CheckpointError (no hang)."""
    bad = root / "checkpoints" / path.name
    if acc.is_main_process:
        shutil.copytree(path, bad)
        f = bad / SHARD_OF_RANK_1[backend]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    acc.wait_for_everyone()
    try:
        CheckpointManager(root).load(bad, acc)
        msg = None
    except CheckpointError as exc:
        msg = str(exc)
    return C.all_gather_object(msg)


class _Exploit:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for any command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _forge(ckpt: Path, rel: str, marker: Path) -> None:
    """``rel`` becomes a torch.save archive whose pickle runs the exploit; the manifest is made to
    agree (whoever can write the directory can rewrite it), so only the loaders can refuse it."""
    import io

    buf = io.BytesIO()
    torch.save({"state": _Exploit(marker), "t": torch.zeros(2)}, buf)
    data = buf.getvalue()
    (ckpt / rel).write_bytes(data)
    if rel in ("trainer_state.json", "COMPLETE"):  # the manifest itself, and the marker written after it
        return
    record = json.loads((ckpt / "trainer_state.json").read_text())
    record["files"][rel].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "trainer_state.json").write_text(json.dumps(record))


def exploits_never_run(acc, path: Path, root: Path) -> dict:
    """Each file of the checkpoint in turn (in a copy) replaced by a pickle that would run code:
    every rank must raise CheckpointError naming it (or not need the file), none may run it."""
    files = C.broadcast_object(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
                               if acc.is_main_process else None)
    ran, outcomes = [], {}
    for i, rel in enumerate(files):
        case, marker = root / f"case_{i}" / path.name, root / f"ran_{i}"
        if acc.is_main_process:
            shutil.copytree(path, case)
            _forge(case, rel, marker)
        acc.wait_for_everyone()
        try:
            CheckpointManager(case.parent).load(case, acc)
            msg = None
        except CheckpointError as exc:
            msg = str(exc)
        msgs = C.all_gather_object(msg)
        acc.wait_for_everyone()
        if marker.exists():
            ran.append(rel)
        if msgs[0] is None:
            outcomes[rel] = "ignored" if all(m is None for m in msgs) else f"only some ranks failed: {msgs}"
        else:
            named = all(m and "\n" not in m and (str(case / rel) in m or str((case / rel).parent) in m) for m in msgs)
            outcomes[rel] = "refused" if named else f"unclear: {msgs}"
        if acc.is_main_process:
            shutil.rmtree(case.parent)
    return {"ran": ran, "outcomes": outcomes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    launcher = launcher_backend()
    conflict_error = None
    if launcher is not None:  # a recipe contradicting the launcher must be refused (before any Accelerator)
        try:
            other = "zero2" if launcher == "fsdp2" else "fsdp2"
            build_accelerator(ParallelConfig(backend=other), train_micro_batch_size=8)
        except ValueError as exc:
            conflict_error = str(exc)
    cfg = ParallelConfig(backend=args.backend, fsdp_wrap_classes="Block" if args.backend == "fsdp2" else "")
    acc = build_accelerator(cfg, train_micro_batch_size=GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = acc.process_index, acc.num_processes
    result = {
        "describe": describe(acc),
        "device": str(acc.device),
        "env_world_size": os.environ.get("WORLD_SIZE"),
        "launcher_backend": launcher,
        "conflict_error": conflict_error,
    }
    if args.backend == "ddp":
        result["collectives"] = collective_checks(rank, world)

    if args.backend == "zero3":  # partition even tiny parameters (default: < 1e5 elements stay whole)
        acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    model = make_model()
    raw = model  # FSDP2 / ZeRO-3 shard its parameters in place; the teacher reads them through it
    teacher, ema = make_model().requires_grad_(False), ModelEMA(model, TEACHER_M)  # built before sharding
    model, opt, sched = prepare_model_and_optimizer(acc, model, *make_opt(model))
    result["sharding"] = sharding_evidence(model)
    result["weight_decay_seen"] = weight_decay_reaches_adamw(opt, model)
    x, y = data()
    per = GLOBAL_BATCH // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    losses = [train_step(acc, model, opt, sched, x, y) for _ in range(STEPS)]
    result["partitioned_at_update"] = sum(p.numel() == 0 for p in raw.parameters())
    momentum_update_(teacher, raw, TEACHER_M)  # collectives for FSDP2 / ZeRO-3: every rank calls
    ema.update(raw)
    reference, teacher_ref = reference_losses(STEPS + 1, teacher_after=STEPS)
    result["teacher_error"] = teacher_error(teacher, ema, teacher_ref)

    cm = CheckpointManager(args.run_dir, keep_last=2)
    digest_saved = param_digest(acc, model)
    state = {"epoch": 0, "data_position": STEPS * GLOBAL_BATCH}
    path = cm.save(STEPS, acc, state)
    rng_after_save = torch.rand(3).tolist()
    perturbed = [train_step(acc, model, opt, sched, x, y) for _ in range(2)]  # moves params, moments, lr
    digest_perturbed = param_digest(acc, model)
    acc.wait_for_everyone()  # save -> load needs a barrier (ENV.md)
    loaded_state = cm.load(cm.latest(), acc)
    rng_after_load = torch.rand(3).tolist()
    digest_loaded = param_digest(acc, model)
    resumed_loss = train_step(acc, model, opt, sched, x, y)

    result.update(
        losses=losses,
        perturbed=perturbed,
        resumed_loss=resumed_loss,
        reference=reference,
        digest_saved=digest_saved,
        digest_perturbed=digest_perturbed,
        digest_loaded=digest_loaded,
        saved_path=str(path),
        latest=str(cm.latest()),
        state_in=state,
        state_out=loaded_state,
        rng_match=rng_after_save == rng_after_load,
        ckpt_files=sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()),
    )
    result["corrupt_errors"] = corrupt_copy_fails_everywhere(acc, cm, path, args.run_dir / "corrupt", args.backend)
    result["exploits"] = exploits_never_run(acc, path, args.run_dir / "exploits")
    rng_all = C.all_gather_object(result["rng_match"])
    result["rng_match_all_ranks"] = all(rng_all)
    if acc.is_main_process:
        args.out.write_text(json.dumps(result, indent=2))
    leave_launch(acc)


if __name__ == "__main__":
    main()
