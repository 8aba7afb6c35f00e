"""What an experiment file declares, as frozen dataclasses (parse.py reads and validates the
file into them). The format is documented in the README ("Experiments") and by example in
recipes/experiments/fmnist_smoke.yaml.

Paths (recipes, shard sets, root, launcher configs) are relative to the working directory, as
the paths inside recipes are. ``{dataset}`` in a recipe path or an override is replaced by the
name of the data set that stage trains on (for a pre-training: its ``pretrain_on``).
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dist_ssl.errors import UserError

STAGES = ("pretrain", "finetune", "finetune_448", "eval")
TRAIN_STAGES = STAGES[:3]
CHAIN_UPSTREAM = {"finetune": "pretrain", "finetune_448": "finetune"}  # eval: its `of`
SCOPES = ("all",) + TRAIN_STAGES  # keys of an override mapping
EVAL_METHODS = ("knn", "linear")
METRICS = TRAIN_STAGES + EVAL_METHODS  # a training stage's metric: top-1 of its eval.json
RUNNER_KEYS = ("output_dir", "seed", "resume")  # the runner sets these (method.init_from: see cells)
# names become directory names and join as <method>-<variant>: no '-', no '/'
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")
_DATASET_TOKEN = "{dataset}"


class ExperimentError(UserError, ValueError):
    """A problem with the experiment file; ``str()`` is one line naming the key."""


@dataclass(frozen=True)
class TrainStage:
    recipe: str                          # may contain {dataset}
    overrides: tuple[str, ...] = ()
    chance_line: Optional[str] = None    # e.g. "2*ln(N)": drawn on this stage's loss curve
    plot: tuple[str, ...] = ("loss",)    # log.jsonl train keys drawn in the curves


@dataclass(frozen=True)
class EvalStage:
    """Frozen-feature evaluation (tools/eval.py) of the backbone of training stage ``of``."""
    of: str = "pretrain"
    methods: tuple[str, ...] = EVAL_METHODS
    args: tuple[str, ...] = ()           # more tools/eval.py options, e.g. ["--knn-k", "20"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    stages: dict  # stage name -> TrainStage | EvalStage, in STAGES order

    def chain(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if s in self.stages)

    def upstream(self, stage: str) -> Optional[str]:
        """The stage whose run this one starts from (or evaluates); None: random init."""
        if stage == "eval":
            return self.stages["eval"].of
        up = CHAIN_UPSTREAM.get(stage)
        return up if up in self.stages else None

    def lineage(self, stage: str) -> tuple[str, ...]:
        """``stage`` and every stage upstream of it."""
        out = [stage]
        while (up := self.upstream(out[-1])) is not None:
            out.append(up)
        return tuple(out)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Optional[str] = None          # shard dirs; None: the recipes' own data paths
    test: Optional[str] = None
    pretrain_on: str = ""                # name of the data pre-trained on ('' = this data set)
    overrides: dict = field(default_factory=dict)  # scope -> overrides
    pixel_floor: bool = True


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: dict                      # scope -> overrides
    methods: Optional[tuple[str, ...]] = None  # None: every method

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def touches(self, stages) -> bool:
        return "all" in self.overrides or any(s in self.overrides for s in stages)


@dataclass(frozen=True)
class Launch:
    """How `run` starts a training stage: 1 process = `python tools/train.py`, more =
    `accelerate launch --config_file C --num_processes P tools/train.py`."""
    processes: int = 1
    accelerate_config: Optional[str] = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Slurm:
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_node: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    env_file: Optional[str] = None
    accelerate_config: Optional[str] = None
    signal_seconds: int = 300
    max_requeues: int = 3


@dataclass(frozen=True)
class PixelFloor:
    """The raw-pixel floor: scikit-learn classifiers on the pixels of train/test."""
    size: Optional[int] = None           # resize to size x size; None: native (one size needed)
    C: float = 0.1                       # LogisticRegression inverse regularisation
    k: int = 5                           # KNeighborsClassifier neighbours
    max_train: Optional[int] = None      # first (by instance id) training images used


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    description: str
    root: Path
    seeds: tuple[int, ...]
    datasets: dict                       # name -> Dataset
    pretrain_data: dict                  # name -> shard dir or None (recipe's own)
    methods: dict                        # name -> Method
    variants: Optional[dict]             # name -> Variant; None: no variant axis
    overrides: dict                      # scope -> overrides, every cell
    launch: dict                         # "default" / stage -> Launch
    slurm: dict                          # "default" / stage -> Slurm
    pixel_floor: Optional[PixelFloor]
    decimals: int
    paper: dict                          # metric -> row -> dataset -> percent
    paper_source: str

    def launch_for(self, stage: str) -> Launch:
        return self.launch.get(stage, self.launch["default"])

    def slurm_for(self, stage: str) -> Slurm:
        return self.slurm.get(stage, self.slurm["default"])

    def rows(self) -> list[tuple[str, Optional[str]]]:
        """(method, variant) of every table row, in file order."""
        if self.variants is None:
            return [(m, None) for m in self.methods]
        return [(m, v) for m in self.methods for v, var in self.variants.items() if var.applies_to(m)]


def row_name(method: str, variant: Optional[str]) -> str:
    return method if variant is None else f"{method}-{variant}"


def substitute(text: str, dataset: str) -> str:
    return text.replace(_DATASET_TOKEN, dataset)


# ------------------------------------------------------------------------------ chance line
_FUNCS: dict[str, Callable[[float], float]] = {"ln": math.log, "log": math.log, "log2": math.log2,
                                                "log10": math.log10, "sqrt": math.sqrt}
_VARS = ("N", "C")  # the stage's run.json num_samples, num_classes


def eval_expression(text: str, variables: dict[str, float]) -> float:
    """A small arithmetic expression: numbers, + - * / **, ln/log/log2/log10/sqrt, N and C."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in _VARS:
            if node.id not in variables:
                raise ValueError(f"{node.id} is unknown here")
            return float(variables[node.id])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and len(node.args) == 1 and not node.keywords:
            return _FUNCS[node.func.id](ev(node.args[0]))
        raise ValueError(f"not allowed: {ast.dump(node)[:60]}")

    try:
        return ev(ast.parse(text, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not an expression ({e.msg})") from None
