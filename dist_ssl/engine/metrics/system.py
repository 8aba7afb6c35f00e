"""Process/accelerator memory numbers for the metric sinks (keys ``mem_peak_bytes``, ``mem_current_bytes``)."""
from __future__ import annotations

import os
import resource
import sys
from typing import Optional

import torch

__all__ = ["memory_stats"]


def _current_rss_bytes() -> Optional[float]:
    """Resident set size now, from /proc (Linux); None where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


def memory_stats(device: Optional[torch.device | str] = None) -> dict[str, float]:
    """``{"mem_peak_bytes", "mem_current_bytes"}`` for ``device``.

    CUDA device: ``torch.cuda.max_memory_allocated`` / ``memory_allocated`` (tensor memory
    the caching allocator handed out, not reserved memory; reset the peak with
    ``torch.cuda.reset_peak_memory_stats``). Otherwise (CPU): peak RSS of this process from
    ``getrusage`` (kilobytes on Linux, bytes on macOS) and current RSS where /proc exists.
    ``device=None`` means the current CUDA device once CUDA is initialised, else CPU.
    No device sync is triggered.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return {
            "mem_peak_bytes": float(torch.cuda.max_memory_allocated(dev)),
            "mem_current_bytes": float(torch.cuda.memory_allocated(dev)),
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = float(peak if sys.platform == "darwin" else peak * 1024)
    out = {"mem_peak_bytes": peak_bytes}
    current = _current_rss_bytes()
    if current is not None:
        out["mem_current_bytes"] = current
    return out
