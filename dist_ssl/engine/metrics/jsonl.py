"""JSON Lines sink: one object per ``log`` call, flushed at once, appended across resumes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

from .sink import MetricSink, scalarize

__all__ = ["JSONLSink"]

_RESERVED = ("step", "kind", "time")


class JSONLSink(MetricSink):
    """Writes ``{"step": int, "kind": str, "time": unix_seconds, <metric>: float | null, ...}``.

    Append mode, so a resumed run continues the same file (readers should keep the last record
    per (kind, step) if a crash repeated some steps). Each line is flushed so ``tail -f`` and a
    crash both see complete records. Non-finite values become ``null``: NaN/Infinity are not
    valid JSON and break jq and most JSON readers. Which rank writes is the caller's choice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
        if self._fh is None:
            raise RuntimeError(f"JSONLSink({self.path}) is closed")
        values = scalarize(metrics)
        clash = [k for k in _RESERVED if k in values]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by JSONLSink")
        record: dict[str, object] = {"step": int(step), "kind": kind, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
