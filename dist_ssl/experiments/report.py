"""`tools/experiment.py report`: results tables (Markdown + CSV) and plots from the run directories.

Nothing is typed in: every number is read from a run directory (``eval.json`` of a training
stage: its top-1 on ``data.val``; ``eval_probe.json`` of an evaluation: ``knn_top1`` /
``linear_top1``), in percent. One table per metric (rows: method [variant], columns: data
sets), each entry the mean +- sample standard deviation (n - 1) over the seeds that have a
result, with n; the paper's number beside ours where the experiment file gives one; the
raw-pixel floor rows (pixel_floor.py) under every table. A cell without a result is shown as
missing, with why when its stage record says (failed, interrupted, running, not run).

Output, in ``<root>/report/<name>/`` (experiment files may share a root): ``results.md``, ``results.csv`` (one row per table entry, with
every seed's value), ``<metric>.png`` (bar chart, error bars over seeds, paper values as
markers, floors as hatched bars) and ``curves/<cell>.png`` (plots.py).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dist_ssl.atomic import atomic_write_text
from dist_ssl.experiments.cells import EVAL_OUT, Cell, Plan
from dist_ssl.experiments.spec import EVAL_METHODS, METRICS, Experiment, row_name
from dist_ssl.experiments.status import BACKBONE_FILE, EVAL_FILE, read_record
from dist_ssl.experiments.table_rows import floor_rows, row_label

METRIC_TITLES = {"pretrain": "pre-training run, top-1 on its data.val (%)",
                 "finetune": "fine-tuning, top-1 (%)", "finetune_448": "fine-tuning at 448 px, top-1 (%)",
                 "knn": "k-NN on frozen features, top-1 (%)", "linear": "linear probe on frozen features, top-1 (%)"}


@dataclass
class Entry:
    """One table entry: every seed's value (percent) and, for the seeds without one, why."""
    seeds: tuple[int, ...]
    values: dict = field(default_factory=dict)     # seed -> percent
    missing: dict = field(default_factory=dict)    # seed -> reason

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values.values()) if self.n >= 2 else None


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _why_missing(cell: Cell, metric: str) -> str:
    """Why ``metric`` has no value: the first run of its lineage (upstream first) that has not
    finished, with its recorded status."""
    stage = next((s for k, s in cell.stages.items() if k == metric or (metric in EVAL_METHODS and s.is_eval)),
                 None)
    chain = []
    while stage is not None:
        chain.insert(0, stage)
        stage = stage.upstream
    for stage in chain:
        last = stage is chain[-1]
        if not last and any((stage.run_dir / f).is_file() for f in (EVAL_FILE, EVAL_OUT, BACKBONE_FILE)):
            continue  # an upstream run that finished
        record = read_record(stage.run_dir) or {}
        status = record.get("status")
        if status in ("failed", "interrupted", "running"):
            code = (record.get("attempts") or [{}])[-1].get("exit_code")
            return f"{stage.kind} {status}" + (f" (exit code {code})" if code not in (None, 0) else "")
        if last and status == "done":
            return f"{stage.kind} done, but no top-1 in its result file (no data.val?)"
        return "not run" if last else f"{stage.kind} not run"
    return "not run"


def cell_metrics(cell: Cell) -> dict[str, float]:
    """metric -> percent, for the results this cell's run directories hold."""
    out = {}
    for kind, stage in cell.stages.items():
        if stage.is_eval:
            data = _json(stage.run_dir / EVAL_OUT) or {}
            out.update({m: 100.0 * data[f"{m}_top1"] for m in EVAL_METHODS
                        if isinstance(data.get(f"{m}_top1"), (int, float))})
        else:
            data = _json(stage.run_dir / EVAL_FILE) or {}
            if isinstance(data.get("top1"), (int, float)):
                out[kind] = 100.0 * data["top1"]
    return out


def expected_metrics(exp: Experiment, method: str) -> set[str]:
    stages = exp.methods[method].stages
    out = {s for s in ("finetune", "finetune_448") if s in stages}
    return out | (set(stages["eval"].methods) if "eval" in stages else set())


def collect(plan: Plan) -> dict:
    """metric -> (method, variant) -> dataset -> Entry, for every expected or present result."""
    exp = plan.experiment
    tables: dict = {}
    for cell in plan.cells:
        got = cell_metrics(cell)
        for metric in expected_metrics(exp, cell.method) | set(got):
            entry = tables.setdefault(metric, {}).setdefault((cell.method, cell.variant), {}) \
                .setdefault(cell.dataset, Entry(exp.seeds))
            if metric in got:
                entry.values[cell.seed] = got[metric]
            else:
                entry.missing[cell.seed] = _why_missing(cell, metric)
    # rows whose method expects a metric but whose cells were all filtered out stay absent
    return {m: tables[m] for m in METRICS if m in tables}


def _fmt(value: Optional[float], decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def entry_text(entry: Optional[Entry], decimals: int) -> str:
    if entry is None or entry.n == 0:
        return f"missing (0/{len(entry.seeds) if entry else 0})"
    text = _fmt(entry.mean, decimals)
    if entry.std is not None:
        text += f" ± {_fmt(entry.std, decimals)}"
    text += f" (n={entry.n})" if not entry.missing else f" (n={entry.n} of {len(entry.seeds)})"
    return text


def run_times(plan: Plan) -> list[tuple[str, str, int, float]]:
    """(row, stage kind, finished runs, mean wall minutes over them) from the stage records: the
    compute an experiment took (all attempts of a run summed; runs without a record are absent)."""
    acc: dict = {}
    for run in plan.stages:
        record = read_record(run.run_dir) or {}
        if record.get("status") != "done":
            continue
        cell = next(c for c in plan.cells if c.name == run.cells[0])
        wall = sum(a.get("wall_s") or 0.0 for a in record.get("attempts", []))
        acc.setdefault((cell.row, run.kind), []).append(wall / 60.0)
    return [(row, kind, len(v), statistics.fmean(v)) for (row, kind), v in acc.items()]


def markdown(exp: Experiment, tables: dict, floors: dict, notes: list[str],
             times: list | None = None) -> str:
    d = exp.decimals
    out = [f"# {exp.name}: results", ""]
    if exp.description:
        out += [exp.description.strip(), ""]
    out += [f"Generated by `python tools/experiment.py report {exp.path.name}` from the run directories "
            f"under `{exp.root}` ({dt.datetime.now().astimezone().isoformat(timespec='seconds')}). "
            f"Entries: mean ± sample standard deviation over seeds ({', '.join(map(str, exp.seeds))}), "
            "n = seeds with a result." + (f" Paper numbers: {exp.paper_source}." if exp.paper_source else ""), ""]
    for metric, rows in tables.items():
        datasets = [ds for ds in exp.datasets if any(ds in r for r in rows.values())]
        paper = exp.paper.get(metric, {})
        with_paper = [ds for ds in datasets if any(ds in v for v in paper.values())]
        head = ["method"] + [c for ds in datasets for c in ([ds, f"{ds} (paper)"] if ds in with_paper else [ds])]
        out += [f"## {METRIC_TITLES[metric]}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for (method, variant), entries in rows.items():
            cells = [row_label(exp, method, variant)]
            for ds in datasets:
                cells.append(entry_text(entries.get(ds), d))
                if ds in with_paper:
                    cells.append(_fmt(paper.get(row_name(method, variant), {}).get(ds), 1))
            out.append("| " + " | ".join(cells) + " |")
        for label, values in floor_rows(exp, floors):
            cells = [f"*{label}*"]
            for ds in datasets:
                v = values.get(ds, "n/a")
                cells.append(_fmt(v, d) if isinstance(v, float) else str(v))
                cells += [""] if ds in with_paper else []
            out.append("| " + " | ".join(cells) + " |")
        out += ["", f"![{metric}]({metric}.png)", ""]
    if floors:
        out += ["Raw-pixel floor: " + "; ".join(
            f"{ds}: {r['num_train']} train / {r['num_test']} test images at {r['pixels']}"
            + ("" if r.get("logreg_converged", True) else " (logistic regression did not converge)")
            for ds, r in floors.items() if isinstance(r, dict)) + ".", ""]
    if notes:
        out += ["## Missing results", ""] + [f"- {n}" for n in notes] + [""]
    if times:
        total = sum(n * m for _, _, n, m in times)
        out += ["## Run time", "", f"Wall time of the finished stage runs (from their stage.json; total "
                f"{total:.1f} min).", "", "| row | stage | runs | mean wall (min) |", "|---|---|---|---|"]
        out += [f"| {row} | {kind} | {n} | {m:.1f} |" for row, kind, n, m in times] + [""]
    return "\n".join(out)


def csv_text(exp: Experiment, tables: dict, floors: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "row", "method", "variant", "dataset", "n", "seeds", "mean", "std", "values",
                "missing", "paper"])
    for metric, rows in tables.items():
        for (method, variant), entries in rows.items():
            for ds in exp.datasets:
                e = entries.get(ds)
                if e is None:
                    continue
                paper = exp.paper.get(metric, {}).get(row_name(method, variant), {}).get(ds)
                w.writerow([metric, row_name(method, variant), method, variant or "", ds, e.n, len(e.seeds),
                            _num(e.mean), _num(e.std),
                            ";".join(f"{s}:{v!r}" for s, v in sorted(e.values.items())),
                            ";".join(f"{s}:{why}" for s, why in sorted(e.missing.items())),
                            _num(paper)])
        for label, values in floor_rows(exp, floors):
            for ds, v in values.items():
                w.writerow([metric, label, "", "", ds, 1 if isinstance(v, float) else 0, "", _num(v), "", "",
                            "" if isinstance(v, float) else v, ""])
    return buf.getvalue()


def _num(v) -> str:
    return repr(v) if isinstance(v, float) and math.isfinite(v) else ""


def missing_notes(tables: dict) -> list[str]:
    notes = []
    for metric, rows in tables.items():
        for (method, variant), entries in rows.items():
            for ds, e in entries.items():
                for seed, why in sorted(e.missing.items()):
                    notes.append(f"{metric}: {ds}/{row_name(method, variant)}/seed{seed}: {why}")
    return notes


def compute_floors(exp: Experiment, out=None) -> dict:
    """dataset -> floor result, or a one-line note when it cannot be computed."""
    from dist_ssl.experiments.pixel_floor import FloorError, cached_floor

    floors: dict = {}
    if exp.pixel_floor is None:
        return floors
    for ds in exp.datasets.values():
        if not ds.pixel_floor:
            continue
        if not (ds.train and ds.test):
            floors[ds.name] = "n/a (no train/test shards)"
            continue
        try:
            floors[ds.name] = cached_floor(exp.root / "pixel_floor", ds.name, ds.train, ds.test, exp.pixel_floor)
        except (FloorError, OSError, ValueError) as e:
            floors[ds.name] = f"n/a ({str(e).splitlines()[0][:120]})"
        if out is not None:
            print(f"  pixel floor {ds.name}: {floors[ds.name]}", file=out)
    return floors


def write_report(plan: Plan, out=None, plots: bool = True) -> Path:
    exp = plan.experiment
    report_dir = exp.root / "report" / exp.name  # experiment files may share a root (and its runs)
    report_dir.mkdir(parents=True, exist_ok=True)
    tables = collect(plan)
    floors = compute_floors(exp, out)
    notes = missing_notes(tables)
    atomic_write_text(report_dir / "results.md", markdown(exp, tables, floors, notes, run_times(plan)))
    atomic_write_text(report_dir / "results.csv", csv_text(exp, tables, floors))
    if plots:
        from dist_ssl.experiments.plots import bar_chart, cell_curves

        for metric, rows in tables.items():
            bar_chart(exp, metric, rows, floors, report_dir / f"{metric}.png")
        for cell in plan.cells:
            cell_curves(cell, report_dir / "curves" / (cell.name.replace("/", "__") + ".png"))
    return report_dir
