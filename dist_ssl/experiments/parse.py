"""Read an experiment file (YAML, safe loader) into a validated :class:`spec.Experiment`.

Every mistake is one line naming the file and the key, e.g. ``table2.yaml:
methods.idmm.pretrian: unknown key (did you mean "pretrain"?)``; unknown keys are refused at
every level, recipe files must exist, and override lists must be ``dotted.key=value`` strings.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_ssl.experiments.spec import (EVAL_METHODS, METRICS, NAME_PATTERN, RUNNER_KEYS, SCOPES,
                                       STAGES, TRAIN_STAGES, Dataset, EvalStage, Experiment,
                                       ExperimentError, Launch, Method, PixelFloor, Slurm, TrainStage,
                                       Variant, eval_expression, row_name, substitute)

TOP_KEYS = ("name", "description", "root", "seeds", "datasets", "pretrain_data", "methods", "variants",
            "overrides", "launch", "slurm", "report", "paper")
# tools/eval.py options the runner sets itself
EVAL_OWNED = ("--backbone", "--train", "--test", "--out", "--methods", "--seed")

# ---------------------------------------------------------------------------------- reading
class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> ExperimentError:
        return ExperimentError(f"{self.path.name}: {where}: {message}" if where else
                               f"{self.path.name}: {message}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {key!r}")
            if allowed is not None and key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f' (did you mean "{near[0]}"?)' if near else f" (expected one of {', '.join(allowed)})"
                raise self.fail(_join(where, key), f"unknown key{hint}")
        for key in required:
            if key not in value:
                raise self.fail(_join(where, key), "required")
        return value

    def typed(self, value: Any, where: str, kind, what: str):
        ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
        if not ok:
            raise self.fail(where, f"expected {what}, got {value!r}")
        return value

    def string(self, value, where) -> str:
        return self.typed(value, where, str, "a string")

    def opt_string(self, value, where) -> Optional[str]:
        return None if value is None else self.string(value, where)

    def integer(self, value, where, minimum: int | None = None) -> int:
        self.typed(value, where, int, "an integer")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value}")
        return value

    def name(self, value, where) -> str:
        if not isinstance(value, str) or not NAME_PATTERN.match(value):
            raise self.fail(where, f"{value!r} is not a valid name (letters, digits, '_' and '.'; "
                            "no '-' or '/': names become directory names)")
        return value

    def strings(self, value, where) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list):
            raise self.fail(where, f"expected a list of strings, got {value!r}")
        for i, item in enumerate(value):
            self.string(item, f"{where}[{i}]")
        return tuple(value)

    def overrides(self, value, where) -> tuple[str, ...]:
        items = self.strings(value, where)
        for i, text in enumerate(items):
            key, sep, _ = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise self.fail(f"{where}[{i}]", f"{text!r} is not of the form dotted.key=value")
            if key in RUNNER_KEYS:
                raise self.fail(f"{where}[{i}]", f"{key} is set by the experiment runner "
                                "(seeds: `seeds:`; run directories: `root:`)")
        return items

    def scoped(self, value, where) -> dict:
        """{all|pretrain|finetune|finetune_448: [overrides]}."""
        raw = self.mapping(value, where, SCOPES)
        return {scope: self.overrides(raw[scope], _join(where, scope)) for scope in SCOPES if scope in raw}


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key



# ------------------------------------------------------------------------------- sections
def _train_stage(r: _Reader, raw: Any, where: str) -> TrainStage:
    if isinstance(raw, str):
        return TrainStage(recipe=raw)
    raw = r.mapping(raw, where, ("recipe", "overrides", "chance_line", "plot"), required=("recipe",))
    chance = r.opt_string(raw.get("chance_line"), f"{where}.chance_line")
    if chance is not None:
        try:
            eval_expression(chance, {"N": 100.0, "C": 10.0})
        except (ValueError, ArithmeticError) as e:
            raise r.fail(f"{where}.chance_line", f"{chance!r}: {e} (use numbers, + - * / **, "
                         "ln(), sqrt(), N = the run's images, C = its classes)") from None
    return TrainStage(recipe=r.string(raw["recipe"], f"{where}.recipe"),
                      overrides=r.overrides(raw.get("overrides", []), f"{where}.overrides"),
                      chance_line=chance,
                      plot=r.strings(raw.get("plot", ["loss"]), f"{where}.plot"))


def _eval_stage(r: _Reader, raw: Any, where: str) -> EvalStage:
    if raw is True:
        return EvalStage()
    if isinstance(raw, list):
        raw = {"methods": raw}
    raw = r.mapping(raw, where, ("of", "methods", "args"))
    methods = r.strings(raw.get("methods", list(EVAL_METHODS)), f"{where}.methods")
    bad = [m for m in methods if m not in EVAL_METHODS]
    if not methods or bad:
        raise r.fail(f"{where}.methods", f"choose from {', '.join(EVAL_METHODS)}, got {list(methods)}")
    args = r.strings(raw.get("args", []), f"{where}.args")
    owned = [a for a in args if a.split("=")[0] in EVAL_OWNED]
    if owned:
        raise r.fail(f"{where}.args", f"{owned[0]} is set by the experiment runner")
    of = r.string(raw.get("of", "pretrain"), f"{where}.of")
    if of not in TRAIN_STAGES:
        raise r.fail(f"{where}.of", f"must name a training stage ({', '.join(TRAIN_STAGES)}), got {of!r}")
    return EvalStage(of=of, methods=methods, args=args)


def _method(r: _Reader, name: str, raw: Any, where: str) -> Method:
    raw = r.mapping(raw, where, ("label",) + STAGES)
    stages: dict = {}
    for stage in TRAIN_STAGES:
        if stage in raw:
            stages[stage] = _train_stage(r, raw[stage], f"{where}.{stage}")
    if not stages:
        raise r.fail(where, f"needs at least one training stage ({', '.join(TRAIN_STAGES)})")
    if "finetune_448" in stages and "finetune" not in stages:
        raise r.fail(f"{where}.finetune_448", "continues a finetune stage: declare finetune too")
    if "eval" in raw:
        stages["eval"] = _eval_stage(r, raw["eval"], f"{where}.eval")
        if stages["eval"].of not in stages:
            raise r.fail(f"{where}.eval.of", f"this method has no {stages['eval'].of} stage")
    label = r.string(raw.get("label", name), f"{where}.label")
    return Method(name=name, label=label, stages=stages)


def _dataset(r: _Reader, name: str, raw: Any, where: str) -> Dataset:
    raw = r.mapping(raw, where, ("train", "test", "pretrain_on", "overrides", "pixel_floor"))
    return Dataset(name=name, train=r.opt_string(raw.get("train"), f"{where}.train"),
                   test=r.opt_string(raw.get("test"), f"{where}.test"),
                   pretrain_on=r.name(raw.get("pretrain_on", name), f"{where}.pretrain_on"),
                   overrides=r.scoped(raw.get("overrides"), f"{where}.overrides"),
                   pixel_floor=r.typed(raw.get("pixel_floor", True), f"{where}.pixel_floor", bool,
                                       "true or false"))


def _variant(r: _Reader, name: str, raw: Any, where: str, methods: dict) -> Variant:
    raw = r.mapping(raw, where, ("label", "methods") + SCOPES)
    only = None
    if "methods" in raw:
        only = r.strings(raw["methods"], f"{where}.methods")
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise r.fail(f"{where}.methods", f"unknown method {unknown[0]!r} (methods: {', '.join(methods)})")
    scoped = r.scoped({k: v for k, v in raw.items() if k in SCOPES}, where)
    return Variant(name=name, label=r.string(raw.get("label", name), f"{where}.label"),
                   overrides=scoped, methods=only)


def _env(r: _Reader, raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in r.mapping(raw, where).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise r.fail(_join(where, key), f"expected a string or number, got {value!r}")
        out.append((key, str(value)))
    return tuple(out)


def _launch(r: _Reader, raw: dict, where: str, base: Launch) -> Launch:
    processes = r.integer(raw.get("processes", base.processes), f"{where}.processes", minimum=1)
    config = r.opt_string(raw.get("accelerate_config", base.accelerate_config), f"{where}.accelerate_config")
    if processes > 1 and config is None:
        raise r.fail(f"{where}.accelerate_config", f"required with processes: {processes} "
                     "(e.g. recipes/accelerate/ddp.yaml, or cpu_2proc.yaml on a CPU machine)")
    env = dict(base.env)
    env.update(_env(r, raw.get("env"), f"{where}.env"))
    return Launch(processes=processes, accelerate_config=config, env=tuple(env.items()))


_SLURM_INT = ("nodes", "procs_per_node", "gpus_per_node", "cpus_per_node", "signal_seconds", "max_requeues")
_SLURM_STR = ("partition", "time", "env_file", "accelerate_config")


def _slurm(r: _Reader, raw: dict, where: str, base: Slurm) -> Slurm:
    values = dict(base.__dict__)
    for key in _SLURM_INT:
        if key in raw and not (key == "cpus_per_node" and raw[key] is None):
            values[key] = r.integer(raw[key], f"{where}.{key}", minimum=0 if key in (
                "gpus_per_node", "signal_seconds", "max_requeues") else 1)
    for key in _SLURM_STR:
        if key in raw:
            values[key] = r.opt_string(raw[key], f"{where}.{key}")
    return Slurm(**values)


def _per_stage(r: _Reader, raw: Any, where: str, keys: tuple[str, ...], parse, default) -> dict:
    """{'default': X, stage: X'}: a section's own keys, and ``stages:`` overriding them per stage."""
    raw = r.mapping(raw, where, keys + ("stages",))
    out = {"default": parse(r, raw, where, default)}
    for stage, sub in r.mapping(raw.get("stages"), f"{where}.stages", STAGES).items():
        out[stage] = parse(r, r.mapping(sub, f"{where}.stages.{stage}", keys), f"{where}.stages.{stage}",
                           out["default"])
    return out


def _pixel_floor(r: _Reader, raw: Any, where: str):
    if raw is False:
        return None
    raw = r.mapping({} if raw is True else raw, where, ("size", "C", "k", "max_train"))
    size = raw.get("size")
    c = r.typed(raw.get("C", 0.1), f"{where}.C", (int, float), "a number")
    if c <= 0:
        raise r.fail(f"{where}.C", f"must be > 0, got {c}")
    return PixelFloor(size=None if size is None else r.integer(size, f"{where}.size", minimum=1),
                      C=float(c), k=r.integer(raw.get("k", 5), f"{where}.k", minimum=1),
                      max_train=None if raw.get("max_train") is None else
                      r.integer(raw["max_train"], f"{where}.max_train", minimum=1))


def _paper(r: _Reader, raw: Any, rows: list[str], datasets: dict) -> tuple[dict, str]:
    raw = r.mapping(raw, "paper", ("source",) + METRICS)
    out: dict = {}
    for metric, table in raw.items():
        if metric == "source":
            continue
        for row, values in r.mapping(table, f"paper.{metric}").items():
            if row not in rows:
                near = difflib.get_close_matches(row, rows, n=1)
                hint = f' (did you mean "{near[0]}"?)' if near else f" (rows: {', '.join(rows)})"
                raise r.fail(f"paper.{metric}.{row}", f"not a row of this experiment{hint}")
            for ds, value in r.mapping(values, f"paper.{metric}.{row}", tuple(datasets)).items():
                r.typed(value, f"paper.{metric}.{row}.{ds}", (int, float), "a number (percent)")
                out.setdefault(metric, {}).setdefault(row, {})[ds] = float(value)
    return out, r.opt_string(raw.get("source"), "paper.source") or ""


# ---------------------------------------------------------------------------------- file
def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate; raises :class:`ExperimentError` (one line) on any problem."""
    path = Path(path)
    r = _Reader(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: experiment file not found")
    from dist_ssl.config.overrides import safe_load  # YAML 1.2 floats (5e-4), a SafeLoader

    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise r.fail("", f"not valid YAML ({str(e).splitlines()[0]})") from None
    raw = r.mapping(raw, "", TOP_KEYS, required=("datasets", "methods"))
    name = r.name(raw.get("name", path.stem), "name")
    methods = {r.name(k, f"methods.{k}"): _method(r, k, v, f"methods.{k}")
               for k, v in r.mapping(raw["methods"], "methods").items()}
    datasets_raw = raw["datasets"]
    if isinstance(datasets_raw, list):
        datasets_raw = {r.name(d, "datasets"): None for d in datasets_raw}
    datasets = {r.name(k, f"datasets.{k}"): _dataset(r, k, v, f"datasets.{k}")
                for k, v in r.mapping(datasets_raw, "datasets").items()}
    pretrain_data = {r.name(k, f"pretrain_data.{k}"): r.opt_string(v, f"pretrain_data.{k}")
                     for k, v in r.mapping(raw.get("pretrain_data"), "pretrain_data").items()}
    if not methods or not datasets:
        raise r.fail("methods" if not methods else "datasets", "must not be empty")
    variants = None
    if raw.get("variants") is not None:
        variants = {r.name(k, f"variants.{k}"): _variant(r, k, v, f"variants.{k}", methods)
                    for k, v in r.mapping(raw["variants"], "variants").items()}
        if not variants:
            raise r.fail("variants", "must not be empty (leave it out for no variant axis)")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise r.fail("seeds", f"expected a non-empty list of integers, got {seeds!r}")
    seeds = tuple(r.integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise r.fail("seeds", f"repeated seed in {list(seeds)}")
    report = r.mapping(raw.get("report"), "report", ("pixel_floor", "decimals"))
    exp = Experiment(
        path=path.resolve(), name=name,
        description=r.string(raw.get("description", ""), "description"),
        root=Path(r.string(raw.get("root", f"runs/experiments/{name}"), "root")).resolve(),
        seeds=seeds, datasets=datasets, pretrain_data=pretrain_data, methods=methods, variants=variants,
        overrides=r.scoped(raw.get("overrides"), "overrides"),
        launch=_per_stage(r, raw.get("launch"), "launch", ("processes", "accelerate_config", "env"),
                          _launch, Launch()),
        slurm=_per_stage(r, raw.get("slurm"), "slurm", _SLURM_INT + _SLURM_STR, _slurm, Slurm()),
        pixel_floor=_pixel_floor(r, report.get("pixel_floor", True), "report.pixel_floor"),
        decimals=r.integer(report.get("decimals", 2), "report.decimals", minimum=0),
        paper={}, paper_source="")
    _check_references(r, exp)
    rows = [row_name(m, v) for m, v in exp.rows()]
    paper, source = _paper(r, raw.get("paper"), rows, datasets)
    return Experiment(**{**exp.__dict__, "paper": paper, "paper_source": source})


def _check_references(r: _Reader, exp: Experiment) -> None:
    """Names that point elsewhere resolve; every recipe exists; eval has data to evaluate on."""
    for ds in exp.datasets.values():
        if ds.pretrain_on not in exp.datasets and ds.pretrain_on not in exp.pretrain_data:
            raise r.fail(f"datasets.{ds.name}.pretrain_on", f"{ds.pretrain_on!r} is neither a dataset "
                         "nor a pretrain_data entry")
    if exp.variants is not None:
        for m in exp.methods:
            if not any(v.applies_to(m) for v in exp.variants.values()):
                raise r.fail(f"methods.{m}", "no variant applies to this method (add it to a variant's "
                             "methods, or give a variant without `methods:`)")
    for m in exp.methods.values():
        for stage, spec in m.stages.items():
            if stage == "eval":
                for ds in exp.datasets.values():
                    if not (ds.train and ds.test):
                        raise r.fail(f"methods.{m.name}.eval", f"dataset {ds.name} needs train: and test: "
                                     "shard dirs for the frozen-feature evaluation")
                continue
            names = {exp.datasets[d].pretrain_on if stage == "pretrain" else d for d in exp.datasets}
            for ds in sorted(names):
                recipe = Path(substitute(spec.recipe, ds))
                if not recipe.is_file():
                    raise r.fail(f"methods.{m.name}.{stage}", f"recipe not found: {recipe}"
                                 + (f" (for dataset {ds})" if "{dataset}" in spec.recipe else ""))
