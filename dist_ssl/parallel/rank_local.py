"""Rank-local (model-parallel) training state as one checkpointable object: this rank's
``ShardedLinear`` shard(s), their optimizer and their lr scheduler.

The shards stay out of data-parallel wrapping and gradient sync, so the accelerator neither
steps nor saves them: ``RankLocalState`` does both. Its ``state_dict()`` carries every shard's
class range and the world size, so a checkpoint written by P ranks can be resumed by Q ranks:
``load_all_ranks`` rebuilds this rank's rows from every saved rank's state (weights, biases and
every row-shaped optimizer state: AdamW exp_avg / exp_avg_sq, SGD momentum_buffer), and
``full_shards`` assembles the full W [N, D] the same way (tools/export_fc.py).

Shape legend: N = classes of a shard's full classifier, D = feature dim, n_local = this rank's rows.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from dist_ssl.parallel.sharded_fc import ShardedLinear
from dist_ssl.parallel.sharded_fc_ckpt import reshard_rows

__all__ = ["STATE_NAME", "RankLocalState", "reshard", "full_shards"]

STATE_NAME = "rank_local"  # its name in the engine's checkpoints (one file per rank)


class RankLocalState:
    """This rank's shards {name: ShardedLinear} with their optimizer and scheduler.

    ``per_rank`` tells the checkpoint manager that every rank saves its own share (state that is
    the same on every rank is written by rank 0 only).
    """

    per_rank: ClassVar[bool] = True

    def __init__(self, modules: Mapping[str, nn.Module], optimizer, scheduler):
        for name, module in modules.items():
            if not isinstance(module, ShardedLinear):  # only a shard knows its class range
                raise TypeError(f"rank-local module {name!r} is a {type(module).__name__}; only ShardedLinear "
                                "shards can be checkpointed and re-sharded")
        if not modules:
            raise ValueError("RankLocalState: no rank-local modules")
        self.modules = dict(modules)
        self.optimizer, self.scheduler = optimizer, scheduler
        first = next(iter(self.modules.values()))
        self.rank, self.world_size = first.rank, first.world_size

    def step(self) -> None:
        """Once per optimizer step (at the end of gradient accumulation), like the data-parallel
        optimizer: the shards' gradients summed over the micro-batches are applied and cleared."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """{"rank", "world_size", "modules": {name: sharded_state_dict}, "optimizer", "scheduler"}."""
        return {"rank": self.rank, "world_size": self.world_size,
                "modules": {n: m.sharded_state_dict() for n, m in self.modules.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """This rank's own share (same class ranges; another world size: ``load_all_ranks``)."""
        self._check_modules(state["modules"])
        for name, module in self.modules.items():
            module.load_sharded_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def load_all_ranks(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Re-shard: this rank's share rebuilt from every saved rank's state (any old world size)."""
        self._check_modules(states[0]["modules"])
        self.load_state_dict(reshard(states, self.rank, self.world_size, self._param_owners()))

    def _param_owners(self) -> list[str]:
        """The module of each optimizer parameter, in the optimizer's state-dict id order."""
        owner = {id(p): name for name, m in self.modules.items() for p in m.parameters()}
        return [owner[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _check_modules(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        if sorted(saved) != sorted(self.modules):
            raise ValueError(f"rank-local modules: the checkpoint has {sorted(saved)}, this run {sorted(self.modules)}")
        for name, module in self.modules.items():
            n = int(saved[name]["num_classes"])
            if n != module.num_classes:  # e.g. IDMM: one class per training image
                raise ValueError(f"rank-local module {name!r}: the checkpoint's classifier has N={n} classes, "
                                 f"this run's has {module.num_classes} (another training set?); resume with the "
                                 "same data or start a new output_dir")


def reshard(states: Sequence[Mapping[str, Any]], rank: int, world_size: int, owners: Sequence[str]) -> dict:
    """The state of ``rank`` of ``world_size`` from every old rank's ``RankLocalState.state_dict``.
    ``owners[i]``: the module of optimizer parameter i. The scheduler is a function of the step
    alone, the same on every rank."""
    if not states:
        raise ValueError("reshard: no saved states")
    modules = {name: ShardedLinear.reshard([s["modules"][name] for s in states], rank, world_size)
               for name in states[0]["modules"]}
    return {"rank": rank, "world_size": world_size, "modules": modules,
            "optimizer": _reshard_optimizer(states, owners, modules), "scheduler": states[0]["scheduler"]}


def _reshard_optimizer(states: Sequence[Mapping[str, Any]], owners: Sequence[str], new: Mapping[str, dict]) -> dict:
    """Every parameter is a row shard (weight [n_local, D], bias [n_local]), so is every non-scalar
    optimizer state of it (AdamW exp_avg / exp_avg_sq, SGD momentum_buffer): its rows move like the
    parameter's. Scalars (AdamW's step) are the same on every rank."""
    first = states[0]["optimizer"]
    n_params = sum(len(g["params"]) for g in first["param_groups"])
    if n_params != len(owners):
        raise ValueError(f"rank-local optimizer: the checkpoint has {n_params} parameters, this run {len(owners)}")
    out = {"state": {}, "param_groups": first["param_groups"]}
    for pid, per_param in first["state"].items():
        old = [s["modules"][owners[pid]] for s in states]
        rows = [(int(m["shard_start"]), m["weight"].shape[0]) for m in old]
        target = (int(new[owners[pid]]["shard_start"]), new[owners[pid]]["weight"].shape[0])
        out["state"][pid] = {key: _rows(key, pid, [s["optimizer"]["state"][pid][key] for s in states], rows, target)
                             if torch.is_tensor(value) and value.ndim >= 1 else value
                             for key, value in per_param.items()}
    return out


def _rows(key: str, pid: int, parts: list[torch.Tensor], rows: list[tuple[int, int]],
          target: tuple[int, int]) -> torch.Tensor:
    """Rows ``target`` = (start, n) of one optimizer state from its old shards (old ranks' (start, n))."""
    if [p.shape[0] for p in parts] != [n for _, n in rows]:
        raise ValueError(f"optimizer state {key!r} of parameter {pid} is not row-sharded like its module "
                         f"(rows {[p.shape[0] for p in parts]}, the shards have {[n for _, n in rows]})")
    return reshard_rows(parts, [start for start, _ in rows], *target)


def full_shards(states: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """{name: {"weight": [N, D], ("bias": [N],) "num_classes", ...}} of every shard, assembled from
    every saved rank's state (what a 1-rank resume would load)."""
    return {name: ShardedLinear.reshard([s["modules"][name] for s in states], 0, 1) for name in states[0]["modules"]}
