"""PNG plots of an experiment (matplotlib, Agg backend): one bar chart per results table and
the training curves of every cell.

Curves: one panel per training stage of the cell, the ``plot`` keys of its ``log.jsonl`` train
rows against the step (default: the loss), ``top1`` of its eval rows on a second axis (percent),
and the stage's ``chance_line`` (e.g. IDMM's ``2*ln(N)``, N and C from the run's run.json) as a
dashed horizontal line. A resumed run may repeat steps in log.jsonl: the last row per (kind,
step) counts, as the JSONL sink's docstring asks of readers.

Both functions return what they drew (series and reference values) so tests can check it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from dist_ssl.experiments.cells import Cell
from dist_ssl.experiments.spec import Experiment, eval_expression, row_name
from dist_ssl.experiments.table_rows import floor_rows, row_label
from dist_ssl.run_files import METRICS_LOG_FILE, RUN_INFO_FILE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> dict[str, dict[int, dict]]:
    """kind -> step -> row (the last one written for that step); torn last lines are ignored."""
    rows: dict[str, dict[int, dict]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.setdefault(row.get("kind", "train"), {})[row["step"]] = row
    return rows


def chance_value(expr: Optional[str], run_dir: Path) -> Optional[float]:
    if not expr:
        return None
    try:
        info = json.loads((run_dir / RUN_INFO_FILE).read_text())
        return eval_expression(expr, {"N": info["num_samples"], "C": info["num_classes"]})
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError):
        return None


def cell_curves(cell: Cell, path: Path) -> dict:
    """Draw the cell's training curves into ``path``; {stage: {"series": {key: (steps, values)},
    "top1": (steps, values), "chance": value}} (nothing is written when no stage has a log)."""
    panels = {}
    for kind, stage in cell.stages.items():
        if stage.is_eval:
            continue
        log = read_log(stage.run_dir / METRICS_LOG_FILE)
        train, evals = log.get("train", {}), log.get("eval", {})
        if not train and not evals:
            continue
        series = {}
        for key in stage.spec.plot:
            pts = [(s, r[key]) for s, r in sorted(train.items()) if isinstance(r.get(key), (int, float))]
            if pts:
                series[key] = ([p[0] for p in pts], [p[1] for p in pts])
        top1 = [(s, 100.0 * r["top1"]) for s, r in sorted(evals.items()) if isinstance(r.get("top1"), (int, float))]
        panels[kind] = {"series": series, "top1": ([p[0] for p in top1], [p[1] for p in top1]),
                        "chance": chance_value(stage.spec.chance_line, stage.run_dir),
                        "chance_line": stage.spec.chance_line}
    if not panels:
        return panels
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (kind, panel) in zip(axes[0], panels.items()):
        for key, (x, y) in panel["series"].items():
            ax.plot(x, y, label=key, linewidth=1.2)
        if panel["chance"] is not None:
            ax.axhline(panel["chance"], color="red", linestyle="--", linewidth=1,
                       label=f"chance {panel['chance_line']} = {panel['chance']:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(kind)
        if panel["top1"][0]:
            ax2 = ax.twinx()
            ax2.plot(*panel["top1"], color="black", marker="o", markersize=3, linewidth=1, label="eval top-1")
            ax2.set_ylabel("eval top-1 (%)")
            ax2.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(cell.name, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return panels


def bar_chart(exp: Experiment, metric: str, rows: dict, floors: dict, path: Path) -> dict:
    """Grouped bars (data sets x rows) with error bars over seeds, the paper's values as markers
    and the raw-pixel floors as hatched bars; {(row, dataset): (mean, std)} of what was drawn."""
    plt = _pyplot()
    datasets = [ds for ds in exp.datasets if any(ds in r for r in rows.values())]
    floor = [(label, v) for label, v in floor_rows(exp, floors)]
    groups = list(rows) + [label for label, _ in floor]
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + len(datasets) * len(groups) * 0.35), 4.0))
    drawn = {}
    for g, (method, variant) in enumerate(rows):
        xs, ys, errs = [], [], []
        for i, ds in enumerate(datasets):
            e = rows[(method, variant)].get(ds)
            if e is None or e.mean is None:
                continue
            xs.append(i + (g - (len(groups) - 1) / 2) * width)
            ys.append(e.mean)
            errs.append(e.std if e.std is not None else float("nan"))  # n = 1: no error bar
            drawn[(row_name(method, variant), ds)] = (e.mean, e.std)
            paper = exp.paper.get(metric, {}).get(row_name(method, variant), {}).get(ds)
            if paper is not None:
                ax.plot(xs[-1], paper, marker="x", color="black", markersize=7, linestyle="none",
                        label="paper" if "paper" not in ax.get_legend_handles_labels()[1] else None)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=row_label(exp, method, variant))
    for k, (label, values) in enumerate(floor):
        g = len(rows) + k
        pts = [(i + (g - (len(groups) - 1) / 2) * width, values[ds]) for i, ds in enumerate(datasets)
               if isinstance(values.get(ds), float)]
        if pts:
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, color="lightgray", edgecolor="gray",
                   hatch="//", label=label)
            drawn.update({(label, ds): (values[ds], None) for ds in datasets if isinstance(values.get(ds), float)})
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{exp.name}: {metric}")
    finite = [v[0] for v in drawn.values() if v[0] is not None and math.isfinite(v[0])]
    if finite:
        ax.set_ylim(0.0, min(100.0, max(finite) + 8))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return drawn
