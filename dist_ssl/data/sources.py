"""Enumerate a SOURCE into records ``(ref, label)`` plus class names.

SOURCE schemes:
  ``imagefolder:DIR``  one sub-folder per class (sorted by name = class index); any files
                       inside, nested folders allowed; hidden files/folders are ignored.
  ``idx:DIR``          MNIST-format IDX files; ``split`` train -> ``train-*``, test -> ``t10k-*``.
                       Class names: Fashion-MNIST names if DIR's name contains "fashion" and
                       there are 10 labels, else "0".."9".
  ``list:FILE``        CSV with ``path`` and ``label`` header columns (other columns ignored);
                       label = class name (classes sorted by name); relative paths are
                       relative to the CSV's folder.

For file sources ``ref`` is the path relative to ``Source.root`` (as written in the CSV for
list sources); for IDX it is the row number as a string. Nothing is decoded here.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_ssl.data.errors import SourceError
from dist_ssl.data.idx_format import SPLIT_PREFIX, idx_class_names, load_idx_split

logger = logging.getLogger(__name__)

SCHEMES = ("imagefolder", "idx", "list")


@dataclass(frozen=True)
class Record:
    """One input image: ``ref`` (source-relative path or IDX row) and class index."""

    ref: str
    label: int


@dataclass
class Source:
    """An enumerated SOURCE. ``pixels`` is set for IDX only (``[N, H, W]`` uint8)."""

    kind: str
    spec: str
    root: Path
    classes: list[str]
    records: list[Record]
    pixels: np.ndarray | None = None

    def path_of(self, rec: Record) -> str:
        """Absolute path of a file record."""
        return os.path.join(self.root, rec.ref)


def open_source(spec: str, split: str = "train") -> Source:
    """Parse ``scheme:PATH`` and enumerate it. Raises :class:`SourceError` on any problem."""
    if split not in SPLIT_PREFIX:
        raise SourceError(f"unknown split {split!r} (expected one of {sorted(SPLIT_PREFIX)})")
    scheme, sep, path = spec.partition(":")
    if not sep or scheme not in SCHEMES:
        raise SourceError(f"unknown SOURCE scheme in {spec!r} "
                          f"(expected imagefolder:DIR, idx:DIR or list:FILE)")
    if not path:
        raise SourceError(f"SOURCE {spec!r} names no path")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise SourceError(f"SOURCE path does not exist: {p}")
    canonical = f"{scheme}:{p}"
    if scheme == "imagefolder":
        return _imagefolder(canonical, p)
    if scheme == "idx":
        return _idx(canonical, p, split)
    return _csv_list(canonical, p)


def _require_dir(p: Path) -> None:
    if not p.is_dir():
        raise SourceError(f"SOURCE path is not a directory: {p}")


def _files_under(folder: Path) -> list[str]:
    """All non-hidden files under ``folder``, as sorted paths relative to it.

    ``folder`` itself may be a symlink; symlinked sub-folders are not followed (no cycles).
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        out.extend(os.path.normpath(os.path.join(rel, f))
                   for f in filenames if not f.startswith("."))
    return sorted(out)


def _imagefolder(spec: str, root: Path) -> Source:
    _require_dir(root)
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if (root / e).is_dir()]
    if len(classes) < len(entries):
        logger.warning("%s: ignoring %d file(s) outside class folders",
                       root, len(entries) - len(classes))
    if not classes:
        raise SourceError(f"{root}: no class folders (expected one sub-folder per class)")
    records = []
    for label, name in enumerate(classes):
        files = _files_under(root / name)
        if not files:
            raise SourceError(f"{root / name}: class folder '{name}' is empty")
        records.extend(Record(os.path.join(name, f), label) for f in files)
    return Source("imagefolder", spec, root, classes, records)


def _idx(spec: str, root: Path, split: str) -> Source:
    _require_dir(root)
    images, labels = load_idx_split(root, split)
    if len(images) == 0:
        raise SourceError(f"{root}: the {split} split has no images")
    classes = idx_class_names(root, labels)
    order = np.argsort(labels, kind="stable")  # records sorted by (label, row)
    records = [Record(str(int(i)), int(labels[i])) for i in order]
    return Source("idx", spec, root, classes, records, pixels=images)


def _csv_row(csv_path: Path, line: int, row: dict) -> tuple[str, str]:
    """Validated ``(normalised path, label)`` of one CSV row."""
    path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
    if not path:
        raise SourceError(f"{csv_path} line {line}: empty path")
    if not label:
        raise SourceError(f"{csv_path} line {line}: empty label for {path}")
    path = os.path.normpath(path)
    if not os.path.isfile(os.path.join(csv_path.parent, path)):
        raise SourceError(f"{csv_path} line {line}: file not found: {path}")
    return path, label


def _read_csv(csv_path: Path) -> list[tuple[str, str]]:
    rows, first_line = [], {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in ("path", "label"):
            if col not in header:
                raise SourceError(f"{csv_path}: missing column '{col}' "
                                  f"(header has: {', '.join(header) or 'nothing'})")
        for row in reader:
            path, label = _csv_row(csv_path, reader.line_num, row)
            if path in first_line:
                raise SourceError(f"{csv_path} line {reader.line_num}: duplicate path {path} "
                                  f"(first on line {first_line[path]})")
            first_line[path] = reader.line_num
            rows.append((path, label))
    return rows


def _csv_list(spec: str, csv_path: Path) -> Source:
    if not csv_path.is_file():
        raise SourceError(f"SOURCE list is not a file: {csv_path}")
    try:
        rows = _read_csv(csv_path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{csv_path}: not a readable UTF-8 CSV ({e})") from None
    if not rows:
        raise SourceError(f"{csv_path}: no rows (empty source)")
    classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    records = sorted((Record(p, index[lbl]) for p, lbl in rows),
                     key=lambda r: (r.label, r.ref))
    return Source("list", spec, csv_path.parent, classes, records)
