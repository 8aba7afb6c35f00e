"""Every random-number stream of one process, saved as one safetensors file (no pickle).

Streams: Python's ``random``, NumPy's global ``np.random``, torch's CPU generator and every CUDA
device's generator. Integer states are stored as int64 tensors, the few scalars (Python's
version / gauss cache, NumPy's position / gauss cache) as safetensors metadata strings; floats
as ``float.hex`` so the round trip is exact.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_rng_state", "load_rng_state"]

_FORMAT = "dist_ssl-rng-1"


def _float_or_none(text: str):
    return None if text == "None" else float.fromhex(text)


def _hex_or_none(value) -> str:
    return "None" if value is None else float(value).hex()


def save_rng_state(path: str | Path) -> None:
    """Write this process's RNG streams to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    meta = {"format": _FORMAT, "python_version": str(version), "python_gauss": _hex_or_none(gauss),
            "numpy_name": str(name), "numpy_pos": str(int(pos)), "numpy_has_gauss": str(int(has_gauss)),
            "numpy_cached_gaussian": float(cached).hex()}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: str | Path) -> list[str]:
    """Restore the streams saved in ``path``; returns the streams it could not restore
    (CUDA devices that this machine lacks or that the checkpoint lacks). Raises on a file that
    is not such a state (ValueError / KeyError / safetensors errors)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not a dist_ssl RNG state (format {meta.get('format')!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    py = tuple(int(v) for v in t["python"].tolist())
    keys = t["numpy"].numpy().astype(np.uint32)
    if len(py) != 625 or keys.shape != (624,) or t["torch_cpu"].dtype != torch.uint8:
        raise ValueError("RNG state has the wrong shape")
    # parse everything before setting anything: a bad file leaves the streams untouched
    py_state = (int(meta["python_version"]), py, _float_or_none(meta["python_gauss"]))
    np_state = (meta["numpy_name"], keys, int(meta["numpy_pos"]), int(meta["numpy_has_gauss"]),
                float.fromhex(meta["numpy_cached_gaussian"]))
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(t["torch_cpu"])
    saved_cuda = sorted(k for k in t if k.startswith("cuda_"))
    missing = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            if f"cuda_{i}" in t:
                torch.cuda.set_rng_state(t[f"cuda_{i}"], i)
            else:
                missing.append(f"cuda:{i}")
        missing += [k.replace("_", ":") for k in saved_cuda if int(k[5:]) >= n]
    elif saved_cuda:
        missing += [k.replace("_", ":") for k in saved_cuda]
    return missing
