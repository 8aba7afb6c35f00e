"""``ShardedLinear``: this rank's contiguous class range of an exact N-way linear classifier,
the module users build (IDMM's instance classifier, ``methods/idmm.py``), with its reproducible
init and re-sharding.

Its loss is ``sharded_soft_ce.sharded_soft_cross_entropy`` (the math, memory and precision are
documented there); checkpoints of the shards are re-sharded by ``sharded_fc_ckpt``.
Shape legend: N = number of classes (global), n_local = classes of this rank, D = feature dim.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from dist_ssl.parallel.sharded_fc_ckpt import reshard_state
from dist_ssl.parallel.sharded_fc_gather import gather_rows, group_rank_size
from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

__all__ = ["shard_range", "init_rows", "ShardedLinear"]

INIT_BLOCK_ROWS = 4096  # init RNG granularity: row i depends only on (seed, i // 4096), never on P or N


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(shard_start, n_local) of ``rank``: contiguous ranges in rank order covering [0, N);
    sizes differ by at most 1 and the first N % P ranks get the extra class."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def init_rows(seed: int, start: int, n: int, dim: int, std: float, dtype=torch.float32) -> torch.Tensor:
    """Rows [start, start+n) of the full N x D normal(0, std) init of ``seed``, built block by
    block (generator seeded by (seed, block index)) so the full matrix never exists and any
    sharding gives the same rows."""
    out = torch.empty(n, dim, dtype=dtype)
    gen = torch.Generator()
    blk0, blk1 = start // INIT_BLOCK_ROWS, (start + n - 1) // INIT_BLOCK_ROWS
    for blk in range(blk0, blk1 + 1 if n else blk0):
        gen.manual_seed(_block_seed(seed, blk))
        rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=gen)
        lo, hi = max(start, blk * INIT_BLOCK_ROWS), min(start + n, (blk + 1) * INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = rows[lo - blk * INIT_BLOCK_ROWS : hi - blk * INIT_BLOCK_ROWS] * std
    return out


def _block_seed(seed: int, block: int) -> int:
    # CPU generators keep only 32 bits of a seed, so (seed << 32 | block) would drop the seed: hash both
    digest = hashlib.blake2b(f"sharded_fc:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ShardedLinear(nn.Module):
    """This rank's shard of an N-way linear classifier: weight [n_local, D] = rows
    [shard_start, shard_start + n_local) of W [N, D]; optional bias [n_local] (zeros).

    Keep it out of DDP / FSDP / ZeRO wrapping and gradient sync (its gradient is already the
    exact gradient of the global loss). ``state_dict()`` carries the class range as extra state
    and refuses to load a shard of another range; use ``reshard`` when the world size changes.
    """

    def __init__(self, num_classes: int, dim: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 init_std: float = 0.02, bias: bool = False, group=None):
        super().__init__()
        self.num_classes, self.dim, self.rank, self.world_size, self.group = num_classes, dim, rank, world_size, group
        self.shard_start, self.n_local = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(init_rows(seed, self.shard_start, self.n_local, dim, init_std))
        self.bias = nn.Parameter(torch.zeros(self.n_local)) if bias else None

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, classes=[{self.shard_start}, "
                f"{self.shard_start + self.n_local}), rank={self.rank}/{self.world_size}, bias={self.bias is not None}")

    def _check_group(self) -> None:
        rank, world = group_rank_size(self.group)
        if (rank, world) != (self.rank, self.world_size):
            raise RuntimeError(f"ShardedLinear built for rank {self.rank}/{self.world_size} but the process group "
                               f"is rank {rank}/{world}")

    def loss(self, features, target_a, target_b, lam, smoothing=0.0, chunk_size=None,
             compute_dtype=None, equal_batches=False) -> torch.Tensor:
        """``sharded_soft_cross_entropy`` with this shard (features [B, D] of this rank)."""
        self._check_group()
        return sharded_soft_cross_entropy(features, self.weight, self.shard_start, self.num_classes, target_a,
                                          target_b, lam, smoothing=smoothing, group=self.group,
                                          chunk_size=chunk_size, bias_shard=self.bias, compute_dtype=compute_dtype,
                                          equal_batches=equal_batches)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full W [N, D] on every rank (a collective; N x D memory: tests and small N only)."""
        self._check_group()
        if self.world_size == 1:
            return self.weight.detach()
        sizes = [shard_range(self.num_classes, r, self.world_size)[1] for r in range(self.world_size)]
        return gather_rows(self.weight.detach(), sizes, self.group)

    def sharded_state_dict(self) -> dict:
        """{"weight": [n_local, D], ("bias": [n_local],) "shard_start", "num_classes", "world_size", "rank"}."""
        state = {"weight": self.weight.detach(), **self.get_extra_state()}
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        """Load a state of this exact class range (from ``sharded_state_dict`` or ``reshard``)."""
        self.set_extra_state(state)
        if (self.bias is None) != ("bias" not in state):
            raise ValueError(f"bias: module has {'no ' if self.bias is None else ''}bias, state disagrees")
        self.weight.copy_(state["weight"])
        if self.bias is not None:
            self.bias.copy_(state["bias"])

    def get_extra_state(self) -> dict:
        return {"shard_start": self.shard_start, "num_classes": self.num_classes,
                "world_size": self.world_size, "rank": self.rank}

    def set_extra_state(self, state: dict) -> None:
        n = state["weight"].shape[0] if "weight" in state else self.n_local
        if (state["num_classes"], state["shard_start"], n) != (self.num_classes, self.shard_start, self.n_local):
            raise ValueError(
                f"classifier shard mismatch: saved classes [{state['shard_start']}, ...) of {state['num_classes']} "
                f"(world size {state.get('world_size')}), this rank holds [{self.shard_start}, "
                f"{self.shard_start + self.n_local}) of {self.num_classes}; re-shard with ShardedLinear.reshard")

    @staticmethod
    def reshard(states: list[dict], rank: int, world_size: int) -> dict:
        """From every old rank's ``sharded_state_dict`` (any order, any old world size) to the
        state of ``rank`` in a layout of ``world_size`` ranks (same keys, new range)."""
        if not states:
            raise ValueError("reshard: no states given")
        start, n = shard_range(int(states[0]["num_classes"]), rank, world_size)
        return {**reshard_state(states, start, n), "world_size": world_size, "rank": rank}
