"""Schedules against their closed forms; the lr scheduler across checkpoint round trips."""
from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

from dist_ssl.engine.optim import build_optimizer, param_groups
from dist_ssl.engine.optim_config import OptimConfig
from dist_ssl.engine.schedules import LRMultiplier, build_lr_scheduler
from dist_ssl.step_schedules import cosine, linear, linear_warmup_then_constant, warmup_cosine

TOTAL, WARM, BASE, FINAL, START = 100, 10, 1e-3, 1e-5, 1e-4


def closed_form(step: int) -> float:
    if step < WARM:
        return START + (BASE - START) * step / WARM
    t = min(step - WARM, TOTAL - WARM) / (TOTAL - WARM)
    return FINAL + 0.5 * (BASE - FINAL) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("step", [0, 1, 5, WARM - 1, WARM, WARM + 1, 55, TOTAL - 1, TOTAL, TOTAL + 7])
def test_warmup_cosine_closed_form(step):
    assert warmup_cosine(step, TOTAL, WARM, BASE, FINAL, START) == pytest.approx(closed_form(step), rel=1e-12)


def test_warmup_cosine_landmarks():
    assert warmup_cosine(0, TOTAL, WARM, BASE, FINAL, START) == pytest.approx(START)
    assert warmup_cosine(WARM, TOTAL, WARM, BASE, FINAL, START) == pytest.approx(BASE)
    mid = WARM + (TOTAL - WARM) // 2
    assert warmup_cosine(mid, TOTAL, WARM, BASE, FINAL, START) == pytest.approx((BASE + FINAL) / 2)
    assert warmup_cosine(TOTAL, TOTAL, WARM, BASE, FINAL, START) == pytest.approx(FINAL)
    assert warmup_cosine(5, TOTAL, 0, BASE, FINAL) == pytest.approx(cosine(5, TOTAL, BASE, FINAL))


def test_momentum_and_temperature_helpers():
    # BYOL/DINO momentum 0.996 -> 1 by cosine; DINO teacher temp 0.04 -> 0.07 over 30 steps.
    assert cosine(0, 50, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(25, 50, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine(50, 50, 0.996, 1.0) == 1.0
    assert linear_warmup_then_constant(15, 30, 0.07, 0.04) == pytest.approx(0.055)
    assert linear_warmup_then_constant(300, 30, 0.07, 0.04) == 0.07
    assert linear(3, 4, 0.0, 8.0) == pytest.approx(6.0)


def _opt_and_sched(total: int = TOTAL, layer_decay: float = 0.5):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    model.head = nn.Linear(4, 2)
    cfg = OptimConfig(layer_decay=layer_decay)
    opt = build_optimizer(cfg, param_groups(model, 0.05, layer_decay=layer_decay), lr=BASE)
    sched = build_lr_scheduler(opt, total_steps=total, warmup_steps=WARM, lr=BASE, min_lr=FINAL,
                               start_warmup_lr=START)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        model.head(model.blocks[1](model.blocks[0](torch.ones(1, 4)))).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_scheduler_sets_scaled_group_lrs_per_step():
    model, opt, sched = _opt_and_sched()
    for step in (0, 3, 40):
        _train(model, opt, sched, step - sched.last_epoch)
        assert sched.last_epoch == step
        scales = sorted({g["lr_scale"] for g in opt.param_groups})
        assert scales == pytest.approx([0.25, 0.5, 1.0])
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["lr_scale"] * closed_form(step), rel=1e-9)


def test_scheduler_state_dict_round_trip_mid_schedule():
    model, opt, sched = _opt_and_sched()
    _train(model, opt, sched, 23)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # accelerate loads with weights_only=True

    # Fresh objects built with a different horizon: the checkpoint must win.
    model2, opt2, sched2 = _opt_and_sched(total=999)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.lr_lambdas[0].total_steps == TOTAL and sched2.last_epoch == 23
    _train(model, opt, sched, 17)
    _train(model2, opt2, sched2, 17)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert opt.param_groups[-1]["lr"] == pytest.approx(closed_form(40))
    mult = pickle.loads(pickle.dumps(sched.lr_lambdas[0]))
    assert isinstance(mult, LRMultiplier) and mult(40) == pytest.approx(closed_form(40) / BASE)


def test_scheduler_through_accelerate_save_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:  # Accelerator state is a process-wide singleton
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    try:
        # step_scheduler_with_optimizer=False: otherwise accelerate steps the scheduler
        # num_processes times per call, but our schedules count optimizer steps.
        acc = accelerate.Accelerator(cpu=True, step_scheduler_with_optimizer=False)
        model, opt, sched = acc.prepare(*_opt_and_sched())
        _train(model, opt, sched, 12)
        acc.save_state(str(tmp_path / "ckpt"))
        reset()
        acc2 = accelerate.Accelerator(cpu=True, step_scheduler_with_optimizer=False)
        model2, opt2, sched2 = acc2.prepare(*_opt_and_sched(total=5 * TOTAL))
        acc2.load_state(str(tmp_path / "ckpt"))
        assert sched2.scheduler.last_epoch == 12
        _train(model2, opt2, sched2, 8)
        assert opt2.param_groups[-1]["lr"] == pytest.approx(closed_form(20))
    finally:
        reset()


def test_constant_schedule_and_bad_args():
    m = LRMultiplier(total_steps=10, warmup_steps=4, lr=2.0, min_lr=0.0, kind="constant")
    assert [m(s) for s in (0, 2, 4, 9, 50)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="warmup_steps"):
        LRMultiplier(total_steps=10, warmup_steps=11, lr=1.0, min_lr=0.0)
    with pytest.raises(ValueError, match="schedule"):
        LRMultiplier(total_steps=10, warmup_steps=1, lr=1.0, min_lr=0.0, kind="step")
