"""Expand an experiment into cells and the stage runs they need.

A cell is one (method, variant, dataset, seed); its name is ``<dataset>/<method>[-<variant>]/seed<k>``
and its stages live in ``<root>/<cell name>/<stage>/``, each an ordinary run directory. Stages are
shared where the same run is meant, so it is trained once:
- a pre-training lives under the data set it trains on (``pretrain_on``), so data sets that
  pre-train on the same data (e.g. SIN-10k, then fine-tuned on seven targets) share it;
- a variant names a stage's directory only if it overrides that stage or one upstream of it
  (a variant that changes only fine-tuning shares the method's pre-training).
Two cells that would write one directory with different commands are an error.

Overrides of a training stage, later winning: the data paths (``data.train``: the data it
trains on; ``data.val`` = the test shards for fine-tuning), the experiment's ``overrides``, the
cell's data set's (so data sets sharing a pre-training must agree on its overrides), the
method's stage ``overrides``, the variant's, then what the runner owns: ``seed``,
``method.init_from`` (the upstream run; ``null`` for a fine-tune without pre-training unless
the method sets it, e.g. to an external checkpoint) and ``output_dir``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from dist_ssl.experiments.spec import (EvalStage, Experiment, ExperimentError, TrainStage, row_name,
                                       substitute)
from dist_ssl.run_files import PROBE_FILE as EVAL_OUT  # the eval stage's metrics file

INIT_KEY = "method.init_from"


@dataclass(eq=False)
class StageRun:
    """One run directory: a tools/train.py run (training stages) or a tools/eval.py run (eval)."""
    kind: str                              # pretrain | finetune | finetune_448 | eval
    run_dir: Path
    spec: Union[TrainStage, EvalStage]
    upstream: Optional["StageRun"]
    data_name: str                         # the data set it trains on / evaluates on
    recipe: Optional[Path] = None          # training stages
    args: tuple[str, ...] = ()             # train.py overrides, or tools/eval.py arguments
    cells: list[str] = field(default_factory=list)

    @property
    def is_eval(self) -> bool:
        return self.kind == "eval"

    def describe(self) -> str:
        return f"{self.kind} {self.run_dir}"


@dataclass
class Cell:
    name: str
    method: str
    variant: Optional[str]
    dataset: str
    seed: int
    stages: dict                           # kind -> StageRun, in execution order

    @property
    def row(self) -> str:
        return row_name(self.method, self.variant)


@dataclass
class Plan:
    experiment: Experiment
    cells: list[Cell]
    stages: list[StageRun]                 # every distinct run, in first-use order


def _keys(overrides) -> set[str]:
    return {o.partition("=")[0].strip() for o in overrides}


def _abs(path: str) -> str:
    return str(Path(path).resolve())


def _execution_order(method) -> list[str]:
    """Chain order, with the evaluation right after the stage it evaluates (early numbers)."""
    order = [s for s in method.chain() if s != "eval"]
    if "eval" in method.stages:
        order.insert(order.index(method.stages["eval"].of) + 1, "eval")
    return order


class _Builder:
    def __init__(self, exp: Experiment):
        self.exp = exp
        self.runs: dict[Path, StageRun] = {}

    def stage_dir(self, cell: Cell, kind: str) -> tuple[Path, str]:
        exp, method = self.exp, self.exp.methods[cell.method]
        data = exp.datasets[cell.dataset].pretrain_on if kind == "pretrain" else cell.dataset
        variant = exp.variants[cell.variant] if cell.variant is not None else None
        row = row_name(cell.method, cell.variant if variant and variant.touches(method.lineage(kind)) else None)
        return exp.root / data / row / f"seed{cell.seed}" / kind, data

    def train_args(self, cell: Cell, kind: str, data: str, upstream: Optional[StageRun],
                   run_dir: Path) -> tuple[str, ...]:
        exp, spec = self.exp, self.exp.methods[cell.method].stages[kind]
        ds = exp.datasets[cell.dataset]
        args: list[str] = []
        if kind == "pretrain":
            source = exp.datasets.get(data)
            path = source.train if source is not None else exp.pretrain_data[data]
            if path:
                args.append(f"data.train={_abs(path)}")
        else:
            args += [f"data.train={_abs(ds.train)}"] if ds.train else []
            args += [f"data.val={_abs(ds.test)}"] if ds.test else []
        user = [o for sc in (exp.overrides, ds.overrides) for o in sc.get("all", ()) + sc.get(kind, ())]
        user += list(spec.overrides)
        if cell.variant is not None:
            v = exp.variants[cell.variant].overrides
            user += list(v.get("all", ()) + v.get(kind, ()))
        user = [substitute(o, data) for o in user]
        args += user
        args.append(f"seed={cell.seed}")
        if upstream is not None:
            if INIT_KEY in _keys(user):
                raise ExperimentError(f"{exp.path.name}: methods.{cell.method}.{kind}: {INIT_KEY} is set "
                                      f"by the runner (the {upstream.kind} run); drop it from the overrides")
            args.append(f"{INIT_KEY}={upstream.run_dir}")
        elif kind != "pretrain" and INIT_KEY not in _keys(user):
            args.append(f"{INIT_KEY}=null")  # random init, whatever the recipe names
        args.append(f"output_dir={run_dir}")
        return tuple(args)

    def eval_args(self, cell: Cell, spec: EvalStage, upstream: StageRun, run_dir: Path) -> tuple[str, ...]:
        ds = self.exp.datasets[cell.dataset]
        return ("--backbone", str(upstream.run_dir), "--train", _abs(ds.train), "--test", _abs(ds.test),
                "--methods", ",".join(spec.methods), "--seed", str(cell.seed),
                "--out", str(run_dir / EVAL_OUT), *spec.args)

    def stage(self, cell: Cell, kind: str) -> StageRun:
        exp, method = self.exp, self.exp.methods[cell.method]
        spec = method.stages[kind]
        run_dir, data = self.stage_dir(cell, kind)
        up_kind = method.upstream(kind)
        upstream = cell.stages[up_kind] if up_kind else None
        if kind == "eval":
            run = StageRun(kind, run_dir, spec, upstream, cell.dataset,
                           args=self.eval_args(cell, spec, upstream, run_dir))
        else:
            recipe = Path(substitute(spec.recipe, data)).resolve()
            run = StageRun(kind, run_dir, spec, upstream, data, recipe=recipe,
                           args=self.train_args(cell, kind, data, upstream, run_dir))
        known = self.runs.get(run_dir)
        if known is None:
            self.runs[run_dir] = run
        elif (known.recipe, known.args) != (run.recipe, run.args):
            diff = sorted(set(known.args) ^ set(run.args)) or [str(known.recipe), str(run.recipe)]
            raise ExperimentError(f"{exp.path.name}: cells {known.cells[0]} and {cell.name} share the "
                                  f"run dir {run_dir} but differ in {diff[:4]}: give them different "
                                  "data sets, variants or pretrain_on")
        else:
            run = known
        run.cells.append(cell.name)
        return run


def build_plan(exp: Experiment, only: Optional[list[str]] = None) -> Plan:
    """Every cell (seeds outer, so a partial run already fills a table with n = 1), its stage runs,
    and the distinct runs. ``only``: fnmatch patterns on cell names (their upstream runs stay)."""
    builder = _Builder(exp)
    cells = []
    for seed in exp.seeds:
        for dataset in exp.datasets:
            for method, variant in exp.rows():
                name = f"{dataset}/{row_name(method, variant)}/seed{seed}"
                if only and not any(fnmatch.fnmatchcase(name, p) for p in only):
                    continue
                cell = Cell(name, method, variant, dataset, seed, {})
                for kind in _execution_order(exp.methods[method]):
                    cell.stages[kind] = builder.stage(cell, kind)
                cells.append(cell)
    if only and not cells:
        raise ExperimentError(f"--only {' '.join(only)}: matches no cell (cell names look like "
                              f"{next(iter(exp.datasets))}/{next(iter(exp.methods))}/seed{exp.seeds[0]})")
    return Plan(exp, cells, list(builder.runs.values()))
