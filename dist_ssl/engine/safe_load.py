"""Reading checkpoint files without ever running code from them.

A pickle can call any importable function while it is read (``os.system`` included), so no file
of a checkpoint is unpickled with arbitrary globals. Each pickle-based format gets an unpickler
that can only build an allow-list of plain types:

- ``torch.save`` files (ours and DeepSpeed's): ``torch.load(weights_only=True)``: tensors,
  containers, numbers, strings. DeepSpeed's ZeRO optimizer files also hold three plain records
  of DeepSpeed's own (loss scaler, ZeRO stage enum, fragment address); they are allowed by name,
  for DeepSpeed's loads only (``deepspeed_loads``).
- FSDP2's DCP checkpoints (torch.distributed.checkpoint): the ``.metadata`` file is a plain
  pickle of torch's metadata dataclasses, read by ``RestrictedUnpickler`` with exactly those
  classes allowed; tensor payloads are already ``weights_only``; the byte payloads (optimizer
  hyper-parameters) are read with ``weights_only=True`` by ``SafeLoadPlanner``.

A file outside the allow-list raises ``UnsafeFileError`` (one line) before anything is built.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dist_ssl.errors import UserError

__all__ = ["UnsafeFileError", "safe_torch_load", "RestrictedUnpickler", "SafeFileSystemReader",
           "SafeLoadPlanner", "deepspeed_globals", "deepspeed_loads", "parse_problem"]


class UnsafeFileError(UserError, ValueError):
    """A checkpoint file holds a pickled object outside the allow-list (never built)."""


def _refusal(exc: BaseException) -> str:
    """The line of torch's long weights_only message that names the offending global."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.startswith(("Unsupported global", "Unsupported operand",
                                                  "Trying to", "Unsupported class"))]
    why = (named or lines or [type(exc).__name__])[0]
    return f"refused to unpickle: {why[:200]} (not a plain tensor file: tampered with or not written by dist_ssl)"


def safe_torch_load(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False,
                    allowed: tuple = ()) -> Any:
    """``torch.load(path, weights_only=True)`` (plus the classes in ``allowed``); an object
    outside the allow-list raises UnsafeFileError instead of being built."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(_refusal(exc)) from None


# What torch (2.4 - 2.14) pickles into a DCP ``.metadata`` file, and nothing else.
_DCP_MD = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS = frozenset({
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "TensorProperties"), (_DCP_MD, "MetadataIndex"),
    (_DCP_MD, "StorageMeta"), (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # layout name -> torch.strided etc. (a dict lookup)
    ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
} | {("torch", str(d).removeprefix("torch.")) for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)})


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the ``allowed`` (module, name) pairs; anything
    else (``os.system``, ``builtins.eval``, ...) raises UnsafeFileError before it is called."""

    def __init__(self, file, allowed: frozenset):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafeFileError(f"refused to unpickle: global {module}.{name} is not allowed "
                                  "(tampered with or not written by dist_ssl)")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose ``.metadata`` goes through RestrictedUnpickler, and whose data files
    must be plain names inside the checkpoint directory."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f, DCP_METADATA_GLOBALS).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeFileError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        for info in (metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", "")
            if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
                raise UnsafeFileError(f"{path}: data file {rel!r} is not a plain name in the checkpoint")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor payloads with ``weights_only=True``
    (torch's reads them with ``weights_only=False``)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(f"{read_item.dest_index.fqn}: {_refusal(exc)}") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner does

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def deepspeed_globals() -> tuple:
    """The plain records DeepSpeed pickles into its ZeRO optimizer files (0.15 - 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


@contextlib.contextmanager
def deepspeed_loads(engine) -> Iterator[None]:
    """Within the block, every file ``engine.load_checkpoint`` reads goes through
    ``safe_torch_load`` (DeepSpeed's own engine uses ``weights_only=False``)."""
    ckpt_engine = engine.checkpoint_engine
    allowed = deepspeed_globals()

    def load(path, map_location=None):
        try:
            return safe_torch_load(path, map_location=map_location, allowed=allowed)
        except UnsafeFileError as exc:
            raise UnsafeFileError(f"{path}: {exc}") from None

    ckpt_engine.load = load  # instance attribute: shadows the class's unsafe method
    try:
        yield
    finally:
        del ckpt_engine.load


def parse_problem(path: Path, allowed: tuple = ()) -> str | None:
    """Read the structure of one checkpoint file the way its loader will (pickles through the
    allow-list; tensor data mapped, not read); a one-line problem or None. Lets every rank
    check a share of the files before any is loaded, so an unsafe or unreadable file fails the
    load on every rank at once, never one rank in the middle of a collective."""
    try:
        if path.suffix in (".pt", ".bin", ".pth"):
            try:
                safe_torch_load(path, mmap=True, allowed=allowed)
            except RuntimeError as exc:  # mmap needs the zip format; a legacy file is read whole
                if "mmap" not in str(exc):
                    raise
                safe_torch_load(path, allowed=allowed)
        elif path.name == ".metadata":  # DCP
            with open(path, "rb") as f:
                RestrictedUnpickler(f, DCP_METADATA_GLOBALS).load()
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt"):  # the header, and that its offsets cover the file
                pass
    except UnsafeFileError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unreadable"
        text = " ".join(str(exc).split())[:160]
        return f"unreadable ({type(exc).__name__}: {text})"
    return None
