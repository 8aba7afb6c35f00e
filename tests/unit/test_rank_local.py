"""RankLocalState (dist_ssl/parallel/rank_local.py): the rank-local shards with their optimizer and
scheduler saved per rank and re-sharded on another world size, so that training continues
exactly as an uninterrupted run (IDMM's AdamW case is in tests/unit/test_idmm.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_ssl.parallel.rank_local import RankLocalState, full_shards
from dist_ssl.parallel.sharded_fc import ShardedLinear

N, D = 11, 3


def make(rank: int, world: int) -> RankLocalState:
    fc = ShardedLinear(N, D, rank=rank, world_size=world, seed=5, bias=True)
    opt = torch.optim.SGD(fc.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return RankLocalState({"fc": fc}, opt, sched)


def train(state: RankLocalState, grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """SGD steps with the rows of full gradients (W [N, D], bias [N]) this shard owns."""
    fc = state.modules["fc"]
    rows = slice(fc.shard_start, fc.shard_start + fc.n_local)
    for gw, gb in grads:
        fc.weight.grad, fc.bias.grad = gw[rows].clone(), gb[rows].clone()
        state.step()


def test_sgd_momentum_resharded_3_to_2_continues_like_one_process():
    torch.manual_seed(0)
    grads = [(torch.randn(N, D), torch.randn(N)) for _ in range(5)]
    reference = make(0, 1)
    train(reference, grads)
    three = [make(r, 3) for r in range(3)]
    for s in three:
        train(s, grads[:3])
    saved = [s.state_dict() for s in three]
    assert [(s["rank"], s["world_size"], s["modules"]["fc"]["shard_start"]) for s in saved] == [
        (0, 3, 0), (1, 3, 4), (2, 3, 8)]
    two = [make(r, 2) for r in range(2)]
    for s in two:
        s.load_all_ranks(saved)
        train(s, grads[3:])
    assert two[0].scheduler.last_epoch == reference.scheduler.last_epoch == 5
    for name in ("weight", "bias"):
        got = torch.cat([getattr(s.modules["fc"], name).detach() for s in two])
        torch.testing.assert_close(got, getattr(reference.modules["fc"], name).detach(), rtol=0, atol=1e-7)
    full = full_shards([s.state_dict() for s in two])["fc"]
    assert torch.equal(full["weight"], torch.cat([s.modules["fc"].weight.detach() for s in two]))


def test_own_share_round_trips_and_refuses_another_range():
    torch.manual_seed(1)
    grads = [(torch.randn(N, D), torch.randn(N))]
    state = make(1, 2)
    train(state, grads)
    saved = state.state_dict()
    fresh = make(1, 2)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.modules["fc"].weight, state.modules["fc"].weight)
    momentum = fresh.optimizer.state[fresh.modules["fc"].weight]["momentum_buffer"]
    assert torch.equal(momentum, state.optimizer.state[state.modules["fc"].weight]["momentum_buffer"])
    with pytest.raises(ValueError, match="reshard"):
        make(0, 2).load_state_dict(saved)


def test_optimizer_state_that_is_not_row_sharded_is_refused():
    saved = []
    for r in range(2):
        state = make(r, 2)
        train(state, [(torch.ones(N, D), torch.ones(N))])
        saved.append(state.state_dict())
    saved[1]["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(2, D)  # rows of no shard
    with pytest.raises(ValueError, match="not row-sharded"):
        make(0, 1).load_all_ranks(saved)


def test_only_sharded_linear_modules():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="only ShardedLinear"):
        RankLocalState({"head": lin}, torch.optim.SGD(lin.parameters(), lr=0.1), None)
