"""JSON Lines sink: one object per ``log`` call, flushed at once, one row per (kind, step) across resumes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

from dist_ssl.atomic import atomic_write_text

from .sink import MetricSink, scalarize

__all__ = ["JSONLSink"]

_RESERVED = ("step", "kind", "time")


def _read_rows(path: Path) -> list[dict]:
    """The complete rows of ``path``; a line cut by a crash (or not an object) is dropped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


class JSONLSink(MetricSink):
    """Writes ``{"step": int, "kind": str, "time": unix_seconds, <metric>: float | null, ...}``.

    Append mode, so a resumed run continues the same file; ``rewind(step)`` (called by the
    trainer after it resumed from the checkpoint of ``step``) drops the rows of later steps, which
    the run is about to redo, and a row logged again for a (kind, step) replaces the old one, so
    the file holds one row per (kind, step). Each line is flushed so ``tail -f`` and a crash both
    see complete records. Non-finite values become ``null``: NaN/Infinity are not valid JSON and
    break jq and most JSON readers. Which rank writes is the caller's choice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = {(r.get("kind"), r["step"]) for r in _read_rows(self.path)}
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
        if (kind, int(step)) in self._keys:  # logged again (e.g. the final eval of a resumed run)
            self._rewrite(lambda r: (r.get("kind"), r["step"]) != (kind, int(step)))
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._fh.flush()
        self._keys.add((kind, int(step)))

    def rewind(self, step: int) -> None:
        """Forget the rows after ``step`` (atomically: a crash leaves the old or the new file)."""
        if self._fh is None:
            raise RuntimeError(f"JSONLSink({self.path}) is closed")
        if any(s > step for _, s in self._keys):
            self._rewrite(lambda r: r["step"] <= step)

    def _rewrite(self, keep) -> None:
        self._fh.close()
        rows = [r for r in _read_rows(self.path) if keep(r)]
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        self._keys = {(r.get("kind"), r["step"]) for r in rows}
        self._fh = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
