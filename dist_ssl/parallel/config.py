"""``ParallelConfig``: the data-parallel backend and its knobs (``parallel.*``), read by
parallel/accelerator.py. Torch-free, so loading a recipe does not import torch or accelerate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc

__all__ = ["Backend", "ParallelConfig"]

Backend = Literal["auto", "ddp", "fsdp2", "zero1", "zero2", "zero3"]
_BACKENDS = ("auto", "ddp", "fsdp2", "zero1", "zero2", "zero3")
_MIXED = ("no", "bf16", "fp16")
_COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ParallelConfig:
    backend: Backend = doc("auto", "auto (the launcher's, else DDP when world size > 1) | ddp | fsdp2 | zero1 | "
                                   "zero2 | zero3")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc(
        "no", "autocast / DeepSpeed precision: no | bf16 | fp16 (fp16 needs a GPU)")
    grad_accum_steps: int = doc(1, "micro-batches accumulated per optimizer step")
    fsdp_reshard_after_forward: bool = doc(
        True, "FSDP2: free gathered params after forward (ZeRO-3 like) or keep (ZeRO-2)")
    fsdp_wrap_classes: str = doc(
        "", "FSDP2: comma-separated class names sharded as own units (e.g. Block); empty = root only")
    zero_offload: bool = doc(False, "DeepSpeed: offload optimizer state (and ZeRO-3 params) to CPU memory")
    ddp_find_unused_parameters: bool = doc(
        False, "DDP: tolerate parameters without gradient (costs a graph walk per step)")
    global_batchnorm: bool = doc(True, "BatchNorm statistics over all ranks' batch (SimCLR's global BN) in "
                                       "multi-process runs; False = per process")
    dist_timeout_s: int = doc(1800, "process-group timeout in seconds (raise for slow checkpoint writes)")
    compile: bool = doc(False, "torch.compile the student in place, after DDP / FSDP2 / ZeRO "
                               "wrapping (checkpoints stay interchangeable with eager runs)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = doc(
        "inductor", "torch.compile backend: inductor (generated kernels) | aot_eager "
                    "(graph capture + autograd only: debugging) | eager")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = doc(
        "default", "inductor mode: default | reduce-overhead (CUDA graphs) | "
                   "max-autotune | max-autotune-no-cudagraphs")
    compile_dynamic: bool = doc(False, "False: one graph per input shape (each crop size compiles once); "
                                       "True: shape-generic graphs")

    def validate(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(_BACKENDS)}")
        if self.mixed_precision not in _MIXED:
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} is not one of {', '.join(_MIXED)}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")
        if self.dist_timeout_s < 1:
            raise ValueError(f"dist_timeout_s: must be >= 1, got {self.dist_timeout_s}")
        if self.zero_offload and self.backend not in ("auto", "zero1", "zero2", "zero3"):
            raise ValueError(f"zero_offload: only applies to DeepSpeed backends, not {self.backend!r}")
        if self.fsdp_wrap_classes and self.backend not in ("auto", "fsdp2"):
            raise ValueError(f"fsdp_wrap_classes: only applies to backend fsdp2, not {self.backend!r}")
        if self.compile_backend not in _COMPILE_BACKENDS:
            raise ValueError(f"compile_backend: {self.compile_backend!r} is not one of {', '.join(_COMPILE_BACKENDS)}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"compile_mode: {self.compile_mode!r} is not one of {', '.join(_COMPILE_MODES)}")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(f"compile_mode: {self.compile_mode!r} is an inductor mode; compile_backend is "
                             f"{self.compile_backend!r}")


register_section("parallel", ParallelConfig)
