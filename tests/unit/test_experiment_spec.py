"""Experiment files: parsing and validation (one-line errors naming the key), the expansion into
cells and stage run directories (sharing, override order, runner-owned keys), the printed
commands, and the done / todo / stale decision."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml

from dist_ssl.experiments.cells import build_plan
from dist_ssl.experiments.commands import shell_line, stage_argv
from dist_ssl.experiments.parse import load_experiment
from dist_ssl.experiments.spec import ExperimentError, eval_expression

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def base_spec(tmp: Path) -> dict:
    """A small valid experiment: 2 methods x 2 data sets x 2 seeds."""
    return {
        "name": "t", "root": str(tmp / "root"), "seeds": [0, 1],
        "datasets": {"a": {"train": str(tmp / "a_train"), "test": str(tmp / "a_test")},
                     "b": {"train": str(tmp / "b_train"), "test": str(tmp / "b_test")}},
        "overrides": {"all": ["data.num_workers=0"], "pretrain": ["train.steps=3"],
                      "finetune": ["train.steps=2"]},
        "methods": {
            "idmm": {"pretrain": {"recipe": str(RECIPES / "idmm_fmnist2k.yaml"),
                                  "overrides": ["optim.lr=0.01"], "chance_line": "2*ln(N)"},
                     "finetune": str(RECIPES / "finetune_fmnist2k.yaml"),
                     "eval": {"methods": ["knn"], "args": ["--img-size", "28"]}},
            "scratch": {"finetune": str(RECIPES / "finetune_fmnist2k.yaml")}},
    }


def write(tmp: Path, spec: dict, name: str = "exp.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def load(tmp: Path, spec: dict):
    return load_experiment(write(tmp, spec))


def test_valid_file_loads(tmp_path):
    exp = load(tmp_path, base_spec(tmp_path))
    assert exp.name == "t" and exp.seeds == (0, 1) and list(exp.datasets) == ["a", "b"]
    assert exp.methods["idmm"].chain() == ("pretrain", "finetune", "eval")
    assert exp.methods["scratch"].upstream("finetune") is None
    assert exp.methods["idmm"].upstream("finetune") == "pretrain"
    assert exp.launch_for("finetune").processes == 1  # default: one process, python -m dist_ssl.engine.cli_train
    assert exp.pixel_floor is not None and exp.pixel_floor.C == 0.1


def _set(spec: dict, dotted: str, value):
    node = spec
    *parents, last = dotted.split("/")
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize("edit, message", [
    (("methodz", {}), "exp.yaml: methodz: unknown key (did you mean \"methods\"?)"),
    (("methods/idmm/pretrian", "x.yaml"), "methods.idmm.pretrian: unknown key (did you mean \"pretrain\"?)"),
    (("overrides/all", ["seed=3"]), "overrides.all[0]: seed is set by the experiment runner"),
    (("overrides/pretrain", ["train.steps"]), "overrides.pretrain[0]: 'train.steps' is not of the form"),
    (("overrides/finetune", "train.steps=2"), "overrides.finetune: expected a list of strings"),
    (("methods/scratch/finetune", "recipes/nope_{dataset}.yaml"),
     "methods.scratch.finetune: recipe not found: recipes/nope_a.yaml (for dataset a)"),
    (("methods/scratch/finetune_448", str(RECIPES / "finetune_fmnist2k.yaml")), "x"),  # replaced below
    (("methods/idmm/eval", {"of": "finetune_448"}), "methods.idmm.eval.of: this method has no finetune_448"),
    (("methods/idmm/eval", {"args": ["--out", "x"]}), "methods.idmm.eval.args: --out is set by the"),
    (("methods/idmm/eval", {"methods": ["svm"]}), "methods.idmm.eval.methods: choose from knn, linear"),
    (("seeds", [0, 0]), "seeds: repeated seed in [0, 0]"),
    (("seeds", [0, "1"]), "seeds[1]: expected an integer, got '1'"),
    (("datasets/a/pretrain_on", "sin10k"), "datasets.a.pretrain_on: 'sin10k' is neither a dataset"),
    (("methods/idmm/pretrain/chance_line", "__import__('os')"), "methods.idmm.pretrain.chance_line:"),
    (("launch", {"processes": 2}), "launch.accelerate_config: required with processes: 2"),
    (("paper", {"finetune": {"idmmm": {"a": 1.0}}}), "paper.finetune.idmmm: not a row of this experiment "
                                                     "(did you mean \"idmm\"?)"),
    (("paper", {"finetune": {"idmm": {"c": 1.0}}}), "paper.finetune.idmm.c: unknown key"),
    (("variants", {"no-ls": {}}), "variants.no-ls: 'no-ls' is not a valid name"),
    (("variants", {"ls": {"methods": ["idmm"]}}), "methods.scratch: no variant applies to this method"),
    (("report", {"pixel_floor": {"C": 0}}), "report.pixel_floor.C: must be > 0"),
])
def test_one_line_errors_name_the_key(tmp_path, edit, message):
    spec = base_spec(tmp_path)
    key, value = edit
    if key == "methods/scratch/finetune_448":  # a 448 stage needs the 224 fine-tune it continues
        spec["methods"]["scratch"] = {"pretrain": str(RECIPES / "idmm_fmnist2k.yaml"), "finetune_448": value}
        message = "methods.scratch.finetune_448: continues a finetune stage: declare finetune too"
    else:
        _set(spec, key, value)
    with pytest.raises(ExperimentError) as err:
        load(tmp_path, spec)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ExperimentError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [\n")
    with pytest.raises(ExperimentError, match="bad.yaml: not valid YAML"):
        load_experiment(bad)


def test_chance_line_expressions():
    assert eval_expression("2*ln(N)", {"N": 2040}) == 2 * math.log(2040)
    assert eval_expression("-ln(1/C) + 2**3 - sqrt(4)", {"C": 10}) == pytest.approx(math.log(10) + 6)
    for bad in ("N.__class__", "open('x')", "ln(N, 2)", "[1]", "M"):
        with pytest.raises(ValueError):
            eval_expression(bad, {"N": 3.0, "C": 2.0})


# ------------------------------------------------------------------------------------ cells
def test_cells_dirs_order_and_overrides(tmp_path):
    plan = build_plan(load(tmp_path, base_spec(tmp_path)))
    root = tmp_path / "root"
    # seeds outer: a partial run already has every row at n = 1
    assert [c.name for c in plan.cells] == ["a/idmm/seed0", "a/scratch/seed0", "b/idmm/seed0", "b/scratch/seed0",
                                            "a/idmm/seed1", "a/scratch/seed1", "b/idmm/seed1", "b/scratch/seed1"]
    cell = plan.cells[0]
    assert list(cell.stages) == ["pretrain", "eval", "finetune"]  # eval right after what it evaluates
    pre, ev, ft = cell.stages.values()
    assert pre.run_dir == root / "a" / "idmm" / "seed0" / "pretrain"
    assert pre.recipe == RECIPES / "idmm_fmnist2k.yaml"
    assert pre.args == (f"data.train={tmp_path / 'a_train'}", "data.num_workers=0", "train.steps=3",
                        "optim.lr=0.01", "seed=0", f"output_dir={pre.run_dir}")
    assert ft.args == (f"data.train={tmp_path / 'a_train'}", f"data.val={tmp_path / 'a_test'}",
                       "data.num_workers=0", "train.steps=2", "seed=0", f"method.init_from={pre.run_dir}",
                       f"output_dir={ft.run_dir}")
    assert ev.args == ("--backbone", str(pre.run_dir), "--train", str(tmp_path / "a_train"), "--test",
                       str(tmp_path / "a_test"), "--methods", "knn", "--seed", "0", "--out",
                       str(root / "a" / "idmm" / "seed0" / "eval" / "eval_probe.json"), "--img-size", "28")
    scratch = plan.cells[1].stages["finetune"]
    assert "method.init_from=null" in scratch.args  # random init, whatever the recipe says
    assert len(plan.stages) == 2 * 2 * 4  # nothing shared here
    assert [c.name for c in build_plan(plan.experiment, ["*/scratch/*1"]).cells] == ["a/scratch/seed1",
                                                                                    "b/scratch/seed1"]
    with pytest.raises(ExperimentError, match="matches no cell"):
        build_plan(plan.experiment, ["zzz"])


def test_shared_pretraining_and_variants(tmp_path):
    spec = base_spec(tmp_path)
    spec["seeds"] = [0]
    spec["pretrain_data"] = {"fmnist2k": str(tmp_path / "big")}
    for ds in spec["datasets"].values():
        ds["pretrain_on"] = "fmnist2k"
    # {dataset} in a pre-training's recipe is the data it trains on
    spec["methods"]["idmm"]["pretrain"]["recipe"] = str(RECIPES / "idmm_{dataset}.yaml")
    spec["variants"] = {"base": {}, "ft_long": {"finetune": ["train.steps=5"]},
                        "no_ls": {"pretrain": ["method.label_smoothing=0"], "methods": ["idmm"]}}
    plan = build_plan(load(tmp_path, spec))
    names = [c.name for c in plan.cells]
    assert names == ["a/idmm-base/seed0", "a/idmm-ft_long/seed0", "a/idmm-no_ls/seed0", "a/scratch-base/seed0",
                     "a/scratch-ft_long/seed0", "b/idmm-base/seed0", "b/idmm-ft_long/seed0", "b/idmm-no_ls/seed0",
                     "b/scratch-base/seed0", "b/scratch-ft_long/seed0"]
    cells = {c.name: c for c in plan.cells}
    pre = cells["a/idmm-base/seed0"].stages["pretrain"]
    root = tmp_path / "root"
    # one pre-training on "fmnist2k" for both data sets and for the variant that changes only fine-tuning
    assert pre.recipe == RECIPES / "idmm_fmnist2k.yaml"
    assert pre.run_dir == root / "fmnist2k" / "idmm" / "seed0" / "pretrain"
    assert f"data.train={tmp_path / 'big'}" in pre.args
    for name in ("a/idmm-ft_long/seed0", "b/idmm-base/seed0", "b/idmm-ft_long/seed0"):
        assert cells[name].stages["pretrain"] is pre
    assert pre.cells == ["a/idmm-base/seed0", "a/idmm-ft_long/seed0", "b/idmm-base/seed0", "b/idmm-ft_long/seed0"]
    no_ls = cells["a/idmm-no_ls/seed0"].stages
    assert no_ls["pretrain"].run_dir == root / "fmnist2k" / "idmm-no_ls" / "seed0" / "pretrain"
    assert "method.label_smoothing=0" in no_ls["pretrain"].args
    # downstream of a variant's pre-training: named by the variant, started from its run
    assert no_ls["finetune"].run_dir == root / "a" / "idmm-no_ls" / "seed0" / "finetune"
    assert f"method.init_from={no_ls['pretrain'].run_dir}" in no_ls["finetune"].args
    ft_long = cells["a/idmm-ft_long/seed0"].stages["finetune"]
    assert ft_long.run_dir == root / "a" / "idmm-ft_long" / "seed0" / "finetune" and "train.steps=5" in ft_long.args
    assert cells["a/idmm-base/seed0"].stages["finetune"].run_dir == root / "a" / "idmm" / "seed0" / "finetune"
    # the eval of the shared pre-training is per data set
    assert cells["b/idmm-base/seed0"].stages["eval"].run_dir == root / "b" / "idmm" / "seed0" / "eval"
    # 2 pre-trainings; per data set: idmm fine-tunes x3 (base, ft_long, no_ls), evals x2 (base and
    # ft_long share one), scratch fine-tunes x2
    assert len(plan.stages) == 2 + 2 * (3 + 2 + 2)


def test_two_cells_claiming_one_dir_differently_is_an_error(tmp_path):
    spec = base_spec(tmp_path)
    spec["pretrain_data"] = {"big": str(tmp_path / "big")}
    for ds in spec["datasets"].values():
        ds["pretrain_on"] = "big"
    spec["datasets"]["b"]["overrides"] = {"pretrain": ["optim.lr=0.5"]}  # b's own, on the shared run
    with pytest.raises(ExperimentError, match="share the run dir .*/big/idmm/seed0/pretrain"):
        build_plan(load(tmp_path, spec))


def test_runner_owns_init_from_when_there_is_an_upstream(tmp_path):
    spec = base_spec(tmp_path)
    spec["methods"]["idmm"]["finetune"] = {"recipe": str(RECIPES / "finetune_fmnist2k.yaml"),
                                           "overrides": ["method.init_from=/elsewhere"]}
    with pytest.raises(ExperimentError, match="methods.idmm.finetune: method.init_from is set by the runner"):
        build_plan(load(tmp_path, spec))
    # without a pre-training it is the user's: e.g. an external (ImageNet) checkpoint
    spec = base_spec(tmp_path)
    spec["methods"]["scratch"]["finetune"] = {"recipe": str(RECIPES / "finetune_fmnist2k.yaml"),
                                              "overrides": ["method.init_from=/ext/in1k.safetensors"]}
    ft = build_plan(load(tmp_path, spec)).cells[1].stages["finetune"]
    assert "method.init_from=/ext/in1k.safetensors" in ft.args and "method.init_from=null" not in ft.args


def test_commands(tmp_path):
    spec = base_spec(tmp_path)
    spec["launch"] = {"processes": 2, "accelerate_config": str(RECIPES / "accelerate" / "cpu_2proc.yaml"),
                      "env": {"ACCELERATE_USE_CPU": True, "OMP_NUM_THREADS": 1},
                      "stages": {"finetune": {"processes": 1}}}
    exp = load(tmp_path, spec)
    cell = build_plan(exp).cells[0]
    pre, ev, ft = cell.stages.values()
    argv = stage_argv(pre, exp.launch_for("pretrain"), port=12345)
    assert argv[:8] == [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                        str(RECIPES / "accelerate" / "cpu_2proc.yaml"), "--num_processes", "2",
                        "--main_process_port", "12345"]
    assert argv[8:] == ["-m", "dist_ssl.engine.cli_train", str(pre.recipe), *pre.args]
    line = shell_line(argv, dict(exp.launch_for("pretrain").env))
    assert line.startswith("ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 ") and "-m dist_ssl.engine.cli_train " in line
    assert stage_argv(ft, exp.launch_for("finetune")) == [sys.executable, "-m", "dist_ssl.engine.cli_train",
                                                          str(ft.recipe), *ft.args]
    assert dict(exp.launch_for("finetune").env)["ACCELERATE_USE_CPU"] == "true"  # per-stage keeps the env
    assert stage_argv(ev, exp.launch_for("eval")) == [sys.executable, "-m", "dist_ssl.eval.cli_eval", *ev.args]


def test_every_experiment_file_loads_and_every_stage_config_resolves(monkeypatch):
    """recipes/experiments/*.yaml: valid files, and every stage run's recipe + overrides is a valid
    config (what train.py would say), from the repository root as documented."""
    from dist_ssl.experiments.status import resolve

    monkeypatch.chdir(REPO)
    files = sorted((RECIPES / "experiments").glob("*.yaml"))
    assert {f.stem for f in files} >= {"fmnist_smoke", "idmm_table2_flowers", "idmm_table3", "idmm_table6",
                                       "idmm_table7", "idmm_table8"}
    for path in files:
        plan = build_plan(load_experiment(path))
        errors = [(s.kind, s.cells[0], err) for s in plan.stages if (err := resolve(s).error)]
        assert not errors, (path.name, errors[:3])
        # its own root, or a sibling experiment's it shares runs with (fmnist_table8's full row)
        assert plan.experiment.root.parent == REPO / "runs" / "experiments", path.name


def test_the_readme_example_is_a_valid_experiment(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Experiments"):]
    example = section[section.index("```yaml") + len("```yaml"):]
    example = example[:example.index("```")]
    monkeypatch.chdir(REPO)
    path = tmp_path / "readme.yaml"
    path.write_text(example)
    plan = build_plan(load_experiment(path))
    assert [c.name for c in plan.cells][:3] == ["fmnist2k/idmm-base/seed0", "fmnist2k/idmm-no_ls/seed0",
                                                "fmnist2k/random_init-base/seed0"]
    assert plan.experiment.paper == {"finetune": {"idmm-no_ls": {"fmnist2k": 70.4}}}
