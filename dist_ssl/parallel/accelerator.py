"""Build an ``accelerate.Accelerator`` for the requested data-parallel backend.

Who decides what:
- The launcher (``accelerate launch --config_file recipes/accelerate/<x>.yaml``, or torchrun)
  decides the process topology and may name a backend (it exports ``ACCELERATE_USE_FSDP`` /
  ``ACCELERATE_USE_DEEPSPEED`` + ``ACCELERATE_DEEPSPEED_ZERO_STAGE``). A plain multi-GPU launch
  or torchrun names none.
- The recipe's ``ParallelConfig.backend`` either takes the launcher's (``auto``) or names one;
  a recipe and a launcher naming different backends is an error, never a silent pick.
- The knobs (mixed precision, resharding, offload, clipping, micro batch) always come from the
  recipe: the plugins are built here with explicit values, which override the launcher's env.

Data-parallel scope: only the module handed to ``prepare_model_and_optimizer`` is wrapped by
DDP / FSDP2 / ZeRO. Parameters that must stay rank-local (the model-parallel sharded classifier,
whose shard differs per rank) live in a separate plain ``nn.Module`` with its own, unprepared
optimizer (``parallel/rank_local.py``); the engine steps both and checkpoints the local one per rank.

CPU (no CUDA device, or ``ACCELERATE_USE_CPU=true``): DDP uses accelerate's native MULTI_CPU
path on gloo. FSDP2 and DeepSpeed have no CPU path in accelerate (it silently drops the FSDP
plugin and fails the DeepSpeed batch check), so the Accelerator is constructed with
``ACCELERATE_TORCH_DEVICE=cpu``, a gloo process group and ``torch.cuda.is_available`` reporting
True during construction only (see shared/ENV.md); the real FSDP2 / ZeRO code then runs on gloo.

``compile: true`` compiles the prepared student in place (``parallel/compile.py`` says where, per
backend); accelerate's own dynamo plugin is always off, so the launcher cannot compile behind
the recipe's back (a launcher asking for a dynamo backend the recipe does not is an error).
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
)

from dist_ssl.parallel.compile import compile_student
from dist_ssl.parallel.config import ParallelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "build_accelerator",
    "prepare_model_and_optimizer",
    "describe",
    "launcher_backend",
    "resolve_backend",
]

def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_backend() -> str | None:
    """Backend named by the launcher's environment, or None when it names none (plain DDP/torchrun)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{int(os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2'))}"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1").strip() == "2" else "fsdp1"
    return None


def resolve_backend(requested: str, launcher: str | None, world_size: int) -> str:
    """Recipe backend x launcher backend -> ddp | fsdp2 | zero1-3 | single (one plain process)."""
    where = "the launcher (accelerate config / ACCELERATE_* env)"
    if launcher in ("fsdp1", "zero0"):
        raise ValueError(f"backend: {where} asks for {launcher}, which dist_ssl does not support (fsdp2, zero1-3)")
    if requested == "auto":
        return launcher or ("ddp" if world_size > 1 else "single")
    if launcher is not None and launcher != requested:
        raise ValueError(
            f"backend: the recipe asks for {requested!r} but {where} asks for {launcher!r}; "
            f"launch with recipes/accelerate/{requested}.yaml or set parallel.backend=auto"
        )
    if requested == "ddp" and world_size == 1:
        return "single"
    if requested != "ddp" and world_size == 1 and "LOCAL_RANK" not in os.environ:
        raise ValueError(
            f"backend: {requested!r} needs a launcher (accelerate launch / torchrun), even for one process; "
            "this process was started without one"
        )
    return requested


def _cpu_mode() -> bool:
    return _flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _check_launcher_knobs(cfg: ParallelConfig, backend: str, gradient_clipping: float | None) -> None:
    """Raise when the launcher explicitly asks for a knob value the recipe contradicts."""
    problems = []
    env_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if env_mp != "no" and env_mp != cfg.mixed_precision:  # launchers always export it; "no" = unspecified
        problems.append(f"mixed_precision: launcher {env_mp!r} vs recipe {cfg.mixed_precision!r}")
    if backend.startswith("zero"):
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
            problems.append("deepspeed_config_file: not supported, the recipe's parallel.* fields build the config")
        env_off = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
        if env_off is not None and (env_off != "none") != cfg.zero_offload:
            problems.append(f"zero_offload: launcher offload_optimizer_device={env_off!r}, recipe {cfg.zero_offload}")
        env_clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING")
        if env_clip not in (None, "auto") and float(env_clip) != (gradient_clipping or 0.0):
            problems.append(f"gradient_clipping: launcher {env_clip} vs recipe {gradient_clipping}")
    env_dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if env_dynamo not in ("no", "") and (not cfg.compile or env_dynamo != cfg.compile_backend):
        recipe = cfg.compile_backend if cfg.compile else "off"
        problems.append(f"compile: launcher dynamo_backend {env_dynamo!r} vs recipe parallel.compile {recipe!r} "
                        "(set parallel.compile / compile_backend in the recipe, launch with --dynamo_backend no)")
    env_gas = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if env_gas is not None and env_gas.isdigit() and int(env_gas) != cfg.grad_accum_steps:
        problems.append(f"grad_accum_steps: launcher {env_gas} vs recipe {cfg.grad_accum_steps}")
    if problems:
        raise ValueError("launcher config contradicts the recipe: " + "; ".join(problems))


def _fsdp2_plugin(cfg: ParallelConfig) -> FullyShardedDataParallelPlugin:
    wrap = [c.strip() for c in cfg.fsdp_wrap_classes.split(",") if c.strip()]
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=cfg.fsdp_reshard_after_forward,
        auto_wrap_policy="transformer_based_wrap" if wrap else "no_wrap",
        transformer_cls_names_to_wrap=wrap or None,
        state_dict_type="SHARDED_STATE_DICT",  # checkpoints: each rank writes its own shard (DCP)
        cpu_ram_efficient_loading=False,  # True needs meta-device init (transformers only) and breaks on CPU
        activation_checkpointing=False,
    )


def _deepspeed_plugin(
    cfg: ParallelConfig, stage: int, gradient_clipping: float | None, train_micro_batch_size: int | None
) -> DeepSpeedPlugin:
    if train_micro_batch_size is None or train_micro_batch_size < 1:
        raise ValueError("train_micro_batch_size: DeepSpeed needs the per-process micro batch size (got None)")
    plugin = DeepSpeedPlugin(
        hf_ds_config="none",  # never read a config file from the env: the recipe is the single source
        zero_stage=stage,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        gradient_clipping=float(gradient_clipping or 0.0),  # DS clips inside engine.step(); set again below
        offload_optimizer_device="cpu" if cfg.zero_offload else "none",
        offload_param_device="cpu" if cfg.zero_offload and stage == 3 else "none",
        zero3_init_flag=False,  # models are built before the Accelerator exists
        zero3_save_16bit_model=stage == 3,  # lets accelerator.get_state_dict gather ZeRO-3 shards
    )
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = int(train_micro_batch_size)
    # Always explicit: DeepSpeed (0.19) clips at 1.0 when the key is absent, and the plugin drops 0.0.
    plugin.deepspeed_config["gradient_clipping"] = float(gradient_clipping or 0.0)
    return plugin


@contextlib.contextmanager
def _cuda_pretend_for_construction() -> Iterator[None]:
    """Make accelerate take its GPU code path (FSDP2 / DeepSpeed) while everything runs on CPU."""
    saved_fn = torch.cuda.is_available
    saved_env = {k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")}
    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = saved_fn
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _expected_matches(accelerator: Accelerator, backend: str) -> bool:
    dt = accelerator.distributed_type
    if backend == "single":
        return dt == DistributedType.NO
    if backend == "ddp":
        return dt.name.startswith("MULTI_")  # MULTI_GPU, MULTI_CPU (gloo), MULTI_NPU, ...
    if backend == "fsdp2":
        return dt == DistributedType.FSDP and accelerator.is_fsdp2
    return dt == DistributedType.DEEPSPEED and describe(accelerator)["backend"] == backend


def _accelerator_kwargs(
    cfg: ParallelConfig, backend: str, cpu: bool, gradient_clipping: float | None, micro_batch: int | None
) -> dict:
    handlers = []
    if backend != "single":  # a process group exists only when launched
        timeout = timedelta(seconds=cfg.dist_timeout_s)
        pg = InitProcessGroupKwargs(backend="gloo", timeout=timeout) if cpu else InitProcessGroupKwargs(timeout=timeout)
        handlers.append(pg)
    if backend == "ddp" and cfg.ddp_find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    kwargs = dict(
        mixed_precision=cfg.mixed_precision,
        dynamo_backend="no",  # never accelerate's wrapper compile: prepare_model_and_optimizer compiles in place
        gradient_accumulation_steps=cfg.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    if backend == "fsdp2":
        kwargs["fsdp_plugin"] = _fsdp2_plugin(cfg)
    elif backend.startswith("zero"):
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(cfg, int(backend[-1]), gradient_clipping, micro_batch)
    return kwargs


def build_accelerator(
    cfg: ParallelConfig, *, gradient_clipping: float | None = None, train_micro_batch_size: int | None = None
) -> Accelerator:
    """Construct the Accelerator for ``cfg.backend`` (see the module docstring for the rules).

    ``gradient_clipping`` (max grad norm, None = off) and ``train_micro_batch_size`` (samples per
    process per micro-step) are needed by DeepSpeed, which clips inside its own step and checks
    batch arithmetic; other backends ignore them (the engine clips via accelerator.clip_grad_norm_).
    The scheduler is stepped once per call (``step_scheduler_with_optimizer=False``): schedules
    are functions of the global optimizer step, not of samples per process.
    """
    cfg.validate()
    world_size = _world_size()
    backend = resolve_backend(cfg.backend, launcher_backend(), world_size)
    _check_launcher_knobs(cfg, backend, gradient_clipping)
    if cfg.zero_offload and not backend.startswith("zero"):
        raise ValueError(f"zero_offload: only applies to DeepSpeed backends, resolved backend is {backend!r}")
    cpu = _cpu_mode()
    kwargs = _accelerator_kwargs(cfg, backend, cpu, gradient_clipping, train_micro_batch_size)
    if cpu and backend in ("fsdp2", "zero1", "zero2", "zero3"):
        if backend.startswith("zero"):
            from deepspeed.accelerator import get_accelerator

            get_accelerator()  # DeepSpeed picks its device once: let it see the real (CPU) machine
        with _cuda_pretend_for_construction():
            accelerator = Accelerator(**kwargs)
    else:
        accelerator = Accelerator(cpu=cpu, **kwargs)

    info = describe(accelerator)
    if not _expected_matches(accelerator, backend) or info["num_processes"] != world_size:
        raise RuntimeError(
            f"accelerate built {info} but {backend!r} with {world_size} processes was requested "
            "(accelerate falls back silently; check the launcher flags and the device)"
        )
    logger.info("accelerator: %s on %s", info, accelerator.device)
    return accelerator


def _optimizer_params_outside(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    owned = {id(p) for p in model.parameters()}
    return sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in owned)


def prepare_model_and_optimizer(accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler=None,
                                cfg: ParallelConfig | None = None):
    """Wrap the data-parallel module, its optimizer and (optional) scheduler in one ``prepare`` call.

    ``model`` must be only the data-parallel part: every parameter the optimizer holds must belong
    to it (checked), because FSDP2 re-creates parameters as DTensor shards and ZeRO partitions
    every parameter the optimizer sees. Rank-local modules keep their own unprepared optimizer.
    One call prepares everything together, which FSDP2 requires (the optimizer is re-pointed at
    the sharded parameters) and DeepSpeed requires (one engine owns model + optimizer).
    With ``cfg.compile`` the prepared module is then compiled in place (``parallel/compile.py``).
    Returns ``(model, optimizer, scheduler)``; scheduler is None when none was given.
    """
    foreign = _optimizer_params_outside(model, optimizer)
    if foreign:
        raise ValueError(
            f"optimizer: {foreign} parameter(s) do not belong to the data-parallel module; give rank-local "
            "modules their own optimizer instead of a param group here"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        mbs = accelerator.state.deepspeed_plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto")
        if not isinstance(mbs, int):
            raise ValueError("train_micro_batch_size: DeepSpeed needs it; pass it to build_accelerator")
    objs = [model, optimizer] + ([scheduler] if scheduler is not None else [])
    prepared = accelerator.prepare(*objs)
    if cfg is not None and cfg.compile:
        compile_student(prepared[0], cfg.compile_backend, cfg.compile_mode, cfg.compile_dynamic)
    return prepared[0], prepared[1], (prepared[2] if scheduler is not None else None)


def describe(accelerator: Accelerator) -> dict:
    """dict(distributed_type, num_processes, backend, mixed_precision) of a built Accelerator."""
    dt = accelerator.distributed_type
    if dt == DistributedType.DEEPSPEED:
        backend = f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    elif dt == DistributedType.FSDP:
        backend = "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    elif dt == DistributedType.NO:
        backend = "single"
    else:
        backend = "ddp"
    return dict(
        distributed_type=str(dt.value if hasattr(dt, "value") else dt),
        num_processes=int(accelerator.num_processes),
        backend=backend,
        mixed_precision=str(accelerator.mixed_precision),
    )

