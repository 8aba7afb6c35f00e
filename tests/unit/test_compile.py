"""parallel.compile: torch.compile of the student, in place (dist_ssl/parallel/compile.py).

- inductor on CPU: a compiled IDMM student (vit_pico, 2 global crops) trains like the eager one;
- the compiled module keeps the eager names / parameters, and EMA, momentum teachers and export
  read through both compile forms (in place, and torch.compile's ``_orig_mod`` wrapper);
- config validation and a launcher that would compile behind the recipe's back.

Cost: inductor's first compile of the student takes ~1 min of CPU with a cold cache (gcc on
~20 kernels, see benchmarks/README.md); everything else uses backend "eager"/"aot_eager"
(graph capture without code generation: seconds). The 2-process DDP / FSDP2 runs are
tests/dist/test_compile_dist.py; checkpoints compiled <-> eager through the CLI are
tests/e2e/test_compile_cli.py.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dist_ssl.engine.ema import ModelEMA
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.idmm import IDMMConfig
from dist_ssl.methods.momentum import momentum_update_
from dist_ssl.models.export import export_state_dict, strip_wrapper_prefixes, unwrap_model
from dist_ssl.models.config import ModelConfig
from dist_ssl.parallel.accelerator import build_accelerator, prepare_model_and_optimizer
from dist_ssl.parallel.config import ParallelConfig
from dist_ssl.parallel.compile import compile_student, is_compiled

N, B, STEPS = 23, 6, 3
# inductor fuses and reorders reductions; after 3 AdamW steps the fp32 losses agree to ~1e-6 here
INDUCTOR_RTOL = 1e-4


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()


def make_idmm():
    model = ModelConfig(name="vit_pico_patch4_28", img_size=16, in_chans=1)
    ctx = MethodContext(model=model, num_samples=N, num_classes=10, in_chans=1)
    torch.manual_seed(0)
    return build_method(IDMMConfig(global_size=16, multi_crop=False, seed=3), ctx)


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    views = [torch.randn(B, 1, 16, 16, generator=g) for _ in range(2)]
    return {"index": torch.randperm(N, generator=g)[:B], "label": torch.zeros(B, dtype=torch.long), "views": views}


def idmm_losses(cfg: ParallelConfig) -> tuple[list[float], nn.Module, float]:
    """STEPS AdamW steps of IDMM through build_accelerator + prepare_model_and_optimizer (one process)."""
    method = make_idmm()
    acc = build_accelerator(cfg)
    opt = torch.optim.AdamW(method.student.parameters(), lr=1e-3)
    local = torch.optim.AdamW(method.classifier.parameters(), lr=1e-3)
    method.student, opt, _ = prepare_model_and_optimizer(acc, method.student, opt, cfg=cfg)
    losses, t0 = [], time.process_time()
    for step in range(STEPS):
        out = method(batch(step), step)
        out["loss"].backward()
        for o in (opt, local):
            o.step()
            o.zero_grad()
        losses.append(out["loss"].item())
    return losses, method, time.process_time() - t0


def test_inductor_compiled_idmm_trains_like_eager(fresh_accelerate_state, one_thread):
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # a worker pool would import torch again per worker: slower on 2 cores
    eager, eager_method, _ = idmm_losses(ParallelConfig())
    compiled, method, cpu_s = idmm_losses(ParallelConfig(compile=True, compile_backend="inductor"))
    assert is_compiled(method.student) and not is_compiled(eager_method.student)
    assert all(math.isfinite(v) for v in compiled)
    assert compiled == pytest.approx(eager, rel=INDUCTOR_RTOL), (compiled, eager)
    assert compiled[-1] < compiled[0]  # it trains
    # the compiled student's weights are the eager student's names, and equal after training
    mine, ref = method.student.state_dict(), eager_method.student.state_dict()
    assert list(mine) == list(ref)
    assert max((mine[k] - ref[k]).abs().max().item() for k in ref) < 1e-4
    print(f"inductor: {STEPS} compiled steps incl. first compile took {cpu_s:.1f} s CPU in this process")


# ----------------------------------------------------------------------------- structure
def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_in_place_compile_keeps_names_and_is_seen_through(fresh_accelerate_state, tmp_path):
    model = _tiny()
    keys = list(model.state_dict())
    x = torch.randn(5, 3)
    eager_out = model(x)
    assert compile_student(model, backend="aot_eager") is model and is_compiled(model)
    assert list(model.state_dict()) == keys and unwrap_model(model) is model
    torch.testing.assert_close(model(x), eager_out)
    wrapped = torch.compile(_tiny(), backend="eager")  # the user's form: keys get "_orig_mod."
    assert unwrap_model(wrapped) is wrapped._orig_mod and is_compiled(wrapped)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    assert list(strip_wrapper_prefixes(wrapped.state_dict())) == keys
    out = export_state_dict(wrapped.state_dict(), tmp_path / "w.safetensors", drop_prefixes=())
    assert sorted(load_file(out)) == sorted(keys)


@pytest.mark.parametrize("form", ["in_place", "wrapper"])
def test_momentum_teacher_and_ema_read_a_compiled_student(form, fresh_accelerate_state):
    student = _tiny()
    teacher = _tiny().requires_grad_(False)
    ema = ModelEMA(student, decay=0.75)
    if form == "in_place":
        student.compile(backend="eager")
        live = student
    else:
        live = torch.compile(student, backend="eager")
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    momentum_update_(teacher, live, 0.75)
    ema.update(live)
    x = torch.randn(5, 3)
    assert not is_compiled(ema.module)
    own = torch.func.functional_call(_tiny(), dict(ema.module.named_parameters()), (x,))
    torch.testing.assert_close(ema.module(x), own)  # the EMA's copy runs its own weights, not the student's
    base = _tiny()
    for (name, t), e, b, s in zip(teacher.named_parameters(), ema.module.parameters(), base.parameters(),
                                  student.parameters()):
        expected = 0.75 * b + 0.25 * s
        torch.testing.assert_close(t, expected, msg=name)
        torch.testing.assert_close(e, expected, msg=name)


# ----------------------------------------------------------------------------- config
def test_compile_config_validation():
    ParallelConfig(compile=True).validate()
    ParallelConfig(compile=True, compile_backend="aot_eager").validate()
    ParallelConfig(compile=True, compile_mode="max-autotune").validate()
    for bad, name in [
        (dict(compile_backend="tensorrt"), "compile_backend"),
        (dict(compile_mode="fast"), "compile_mode"),
        (dict(compile_mode="max-autotune", compile_backend="aot_eager"), "compile_mode"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            ParallelConfig(**bad).validate()


def test_launcher_dynamo_backend_must_match_the_recipe(monkeypatch, fresh_accelerate_state):
    for k in [k for k in __import__("os").environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    with pytest.raises(ValueError, match="launcher dynamo_backend 'inductor' vs recipe parallel.compile 'off'"):
        build_accelerator(ParallelConfig())
    with pytest.raises(ValueError, match="'inductor' vs recipe parallel.compile 'aot_eager'"):
        build_accelerator(ParallelConfig(compile=True, compile_backend="aot_eager"))
    acc = build_accelerator(ParallelConfig(compile=True))  # agrees: our in-place compile, not accelerate's
    assert acc.state.dynamo_plugin.backend.value == "NO"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    build_accelerator(ParallelConfig())
