"""The files of a checkpoint that belong to the prepared model(s), optimizer(s), scheduler(s) and
gradient scaler, per backend, and how they are read back (every read goes through
``engine.safe_load``: nothing is unpickled with arbitrary globals).

    single / DDP  model.safetensors (unwrapped parameter names: a DDP checkpoint resumes in one
                  process and back), optimizer.pt, scheduler.pt, scaler.pt; rank 0 writes
    FSDP2         pytorch_model_fsdp_0/ + optimizer_0/ (torch DCP: every rank writes its shards),
                  scheduler.pt (rank 0)
    DeepSpeed     pytorch_model/ (DeepSpeed's save_checkpoint: module, ZeRO partitions of every
                  rank, the lr scheduler), zero_to_fp32.py (DeepSpeed's recovery script: never
                  read or run by dist_ssl)

A second model/optimizer/scheduler gets ``_1`` before the suffix (``model_1.safetensors``).
Writes go through Python file objects, so a full disk surfaces as OSError(ENOSPC) rather than
torch's "unexpected pos" (see ``write_error``).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.api import CheckpointException as DCPException  # a BaseException

from dist_ssl.errors import UserError
from dist_ssl.engine.safe_load import SafeFileSystemReader, SafeLoadPlanner, deepspeed_loads, safe_torch_load

__all__ = ["CheckpointError", "DCPException", "root_cause", "one_line", "write_error", "torch_save", "restoring",
           "save_training_state", "load_training_state", "model_file"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or incompatible; the message names the file."""


def root_cause(exc: BaseException) -> BaseException:
    """DCP reports each rank's failure inside a CheckpointException: the first of them."""
    if isinstance(exc, DCPException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    seen, e = set(), exc
    while e is not None and id(e) not in seen:  # the OSError may hide in __cause__ / __context__
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:  # torch.save to a path reports a full disk as "unexpected pos": ask the filesystem
        st = os.statvfs(directory)
        return st.f_bfree * st.f_frsize < (1 << 20)
    except OSError:
        return False


def write_error(exc: BaseException, directory: Path) -> str:
    """One line for a failed checkpoint write; a full disk is named as such."""
    exc = root_cause(exc)
    if _is_disk_full(exc, directory):
        try:
            free = os.statvfs(directory)
            free = f"{free.f_bavail * free.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        return (f"no space left on device (ENOSPC, disk full: {free} on the filesystem of {directory}); "
                "free space or set output_dir to a bigger disk")
    return f"{type(exc).__name__}: {one_line(exc, 200)}"


def torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:  # a Python file object: ENOSPC keeps its errno (see module doc)
        torch.save(obj, f)


@contextlib.contextmanager
def restoring(f: Path, what: str) -> Iterator[None]:
    """Any failure inside becomes CheckpointError('<f>: cannot restore <what> (<why>)')."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, DCPException) as exc:  # noqa: BLE001 - every failure of a restore names its file
        cause = root_cause(exc)
        raise CheckpointError(f"{f}: cannot restore {what} ({type(cause).__name__}: {one_line(cause, 240)})") from exc


def model_file(i: int) -> str:
    return "model.safetensors" if i == 0 else f"model_{i}.safetensors"


def _numbered(stem: str, i: int, suffix: str = ".pt") -> str:
    return f"{stem}{suffix}" if i == 0 else f"{stem}_{i}{suffix}"


def _raw_optimizer(opt):
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(opt, AcceleratedOptimizer):  # FSDP2's helpers want the torch optimizer
        opt = opt.optimizer
    return opt


def _schedulers(acc) -> list:
    from accelerate.utils import DeepSpeedSchedulerWrapper

    return [s for s in acc._schedulers if not isinstance(s, DeepSpeedSchedulerWrapper)]  # DS saves its own


# ------------------------------------------------------------------ save
def save_training_state(acc, directory: Path) -> None:
    """Write the backend's files into ``directory`` (collective for FSDP2 / DeepSpeed)."""
    dt = acc.distributed_type
    if dt == DistributedType.DEEPSPEED:
        for i, engine in enumerate(acc._models):
            engine.save_checkpoint(str(directory), _numbered("pytorch_model", i, ""), save_latest=False)
    elif dt == DistributedType.FSDP:
        _save_fsdp2(acc, directory)
    elif acc.is_main_process:
        from safetensors.torch import save_model

        for i, model in enumerate(acc._models):
            save_model(acc.unwrap_model(model), str(directory / model_file(i)))
        for i, opt in enumerate(acc._optimizers):
            torch_save(opt.state_dict(), directory / _numbered("optimizer", i))
    if acc.is_main_process:
        for i, sched in enumerate(_schedulers(acc)):
            torch_save(sched.state_dict(), directory / _numbered("scheduler", i))
        if acc.scaler is not None:
            torch_save(acc.scaler.state_dict(), directory / "scaler.pt")


def _fsdp2_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False, cpu_offload=False)  # each rank its own shards


def _save_fsdp2(acc, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _fsdp2_options()
    for i, model in enumerate(acc._models):
        dcp.save({"model": get_model_state_dict(model, options=opts)},
                 storage_writer=dcp.FileSystemWriter(str(directory / f"pytorch_model_fsdp_{i}")))
    for i, opt in enumerate(acc._optimizers):
        state = get_optimizer_state_dict(acc._models[i], _raw_optimizer(opt), options=opts)
        dcp.save({"optimizer": state}, storage_writer=dcp.FileSystemWriter(str(directory / f"optimizer_{i}")))


# ------------------------------------------------------------------ load
def load_training_state(acc, directory: Path) -> None:
    """Restore what ``save_training_state`` wrote (collective for FSDP2 / DeepSpeed);
    raises CheckpointError naming the file."""
    dt = acc.distributed_type
    if dt == DistributedType.DEEPSPEED:
        for i, engine in enumerate(acc._models):
            tag = _numbered("pytorch_model", i, "")
            with restoring(directory / tag, "the DeepSpeed model and optimizer"), deepspeed_loads(engine):
                path, _ = engine.load_checkpoint(str(directory), tag, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
                if path is None:
                    raise FileNotFoundError("DeepSpeed found no checkpoint under this tag")
    elif dt == DistributedType.FSDP:
        _load_fsdp2(acc, directory)
    else:
        from safetensors.torch import load_model

        for i, model in enumerate(acc._models):
            f = directory / model_file(i)
            with restoring(f, "the model"):
                load_model(acc.unwrap_model(model), str(f), strict=True)  # CPU, then copied into the params
        for i, opt in enumerate(acc._optimizers):
            f = directory / _numbered("optimizer", i)
            with restoring(f, "the optimizer"):
                opt.load_state_dict(safe_torch_load(f))
    for i, sched in enumerate(_schedulers(acc)):
        f = directory / _numbered("scheduler", i)
        with restoring(f, "the lr scheduler"):
            sched.load_state_dict(safe_torch_load(f))
    if acc.scaler is not None:
        with restoring(directory / "scaler.pt", "the gradient scaler"):
            acc.scaler.load_state_dict(safe_torch_load(directory / "scaler.pt"))


def _load_fsdp2(acc, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    opts = _fsdp2_options()
    for i, model in enumerate(acc._models):
        d = directory / f"pytorch_model_fsdp_{i}"
        with restoring(d, "the FSDP2 model shards"):
            state = {"model": get_model_state_dict(model, options=opts)}  # the shapes to fill
            dcp.load(state, storage_reader=SafeFileSystemReader(str(d)), planner=SafeLoadPlanner())
            set_model_state_dict(model, state["model"], options=opts)
    for i, opt in enumerate(acc._optimizers):
        d, raw = directory / f"optimizer_{i}", _raw_optimizer(opt)
        with restoring(d, "the FSDP2 optimizer shards"):
            state = {"optimizer": get_optimizer_state_dict(acc._models[i], raw, options=opts)}
            dcp.load(state, storage_reader=SafeFileSystemReader(str(d)), planner=SafeLoadPlanner())
            set_optimizer_state_dict(acc._models[i], raw, state["optimizer"], options=opts)
