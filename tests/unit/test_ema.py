"""EMA against hand computations; DDP and FSDP2 sources on a 1-process gloo group."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_ssl.engine.ema import ModelEMA, unwrap_model
from dist_ssl.methods.momentum import ema_update_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        model[1].running_mean.copy_(torch.randn(4, generator=g))


def _check_step(ema: ModelEMA, model: nn.Module, decay: float, seed: int) -> None:
    before = [p.clone() for p in ema.module.parameters()]
    _perturb(unwrap_model(model), seed)
    ema.update(model)
    src = unwrap_model(model)
    for e, b, s in zip(ema.module.parameters(), before, src.parameters()):
        torch.testing.assert_close(e, decay * b + (1 - decay) * s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_mean, src[1].running_mean)  # copied, not averaged
    assert ema.module[1].num_batches_tracked.item() == src[1].num_batches_tracked.item()


def test_model_ema_matches_hand_computation():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    for seed in (1, 2, 3):
        _check_step(ema, model, 0.9, seed)
    assert ema.num_updates == 3


def test_model_ema_warmup_decay():
    model = _model()
    ema = ModelEMA(model, decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    _check_step(ema, model, 0.1, seed=1)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99


def test_model_ema_state_dict_round_trip():
    model = _model()
    ema = ModelEMA(model, decay=0.9, warmup=True)
    _check_step(ema, model, 0.1, seed=1)
    state = ema.state_dict()
    other = ModelEMA(_model(), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.warmup and other.num_updates == 1
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_ema_update_functional():
    targets = [torch.ones(3), torch.zeros(2, 2, dtype=torch.float64)]
    sources = [torch.full((3,), 3.0), torch.full((2, 2), 10.0, dtype=torch.float32)]
    ema_update_(targets, sources, momentum=0.75)
    torch.testing.assert_close(targets[0], torch.full((3,), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(targets[1], torch.full((2, 2), 2.5, dtype=torch.float64))
    with pytest.raises(ValueError):
        ema_update_(targets, sources[:1], 0.5)


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_model_ema_unwraps_ddp(gloo_group):
    ddp = nn.parallel.DistributedDataParallel(_model())
    ema = ModelEMA(ddp, decay=0.8)
    assert isinstance(ema.module, nn.Sequential)
    assert not any(k.startswith("module.") for k in ema.module.state_dict())
    _check_step(ema, ddp, 0.8, seed=5)
    _check_step(ema, ddp, 0.8, seed=6)


def test_model_ema_fsdp2_source(gloo_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ModelEMA(model, decay=0.5)  # must be built before sharding
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="before sharding"):
        ModelEMA(model, decay=0.5)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, b, s in zip(ema.module.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * s.full_tensor())

# ZeRO-3 (partitioned parameters gathered for the update): tests/dist/test_backends.py, real DeepSpeed.
