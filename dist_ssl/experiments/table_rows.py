"""Row labels of a results table, shared by the Markdown/CSV tables (report.py) and the bar
charts (plots.py): a method [variant] row, and the raw-pixel floor rows (pixel_floor.py)."""
from __future__ import annotations

from typing import Optional

from dist_ssl.experiments.spec import Experiment

__all__ = ["floor_rows", "row_label"]


def row_label(exp: Experiment, method: str, variant: Optional[str]) -> str:
    label = exp.methods[method].label
    return label if variant is None else f"{label} [{exp.variants[variant].label}]"


def floor_rows(exp: Experiment, floors: dict) -> list[tuple[str, dict]]:
    """[(label, dataset -> percent or note)] for the logistic-regression and k-NN floors."""
    if exp.pixel_floor is None or not floors:
        return []
    f = exp.pixel_floor
    lr = {d: (100 * r["logreg_top1"] if isinstance(r, dict) else r) for d, r in floors.items()}
    knn = {d: (100 * r["knn_top1"] if isinstance(r, dict) else r) for d, r in floors.items()}
    return [(f"raw pixels: logistic regression (C={f.C:g})", lr), (f"raw pixels: {f.k}-NN", knn)]
