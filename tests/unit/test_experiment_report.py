"""`report` from recorded results: numbers written into run directories come out of the tables
exactly (mean and sample std against a plain reference), missing cells are shown as missing with
why, the paper's numbers stand beside ours; the curves and bar charts draw what was recorded
(chance line included); the raw-pixel floor equals scikit-learn on independently decoded pixels."""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ssl.experiments import pixel_floor
from dist_ssl.experiments.cells import build_plan
from dist_ssl.experiments.plots import bar_chart, cell_curves
from dist_ssl.experiments.report import collect, write_report
from dist_ssl.experiments.spec import PixelFloor
from dist_ssl.experiments.status import write_record
from test_experiment_spec import base_spec, load  # tests/unit is on sys.path (pytest's prepend import)

SEEDS = (0, 1, 2)


def _plain_mean_std(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def recorded(tmp_path):
    """2 methods x 2 data sets x 3 seeds with recorded results; some missing, one failed."""
    spec = base_spec(tmp_path)
    spec["seeds"] = list(SEEDS)
    spec["methods"]["idmm"]["eval"] = {"methods": ["knn", "linear"]}
    spec["methods"]["idmm"]["label"] = "IDMM"
    spec["paper"] = {"source": "IDMM Table 2", "finetune": {"idmm": {"a": 79.9}, "scratch": {"a": 58.1}},
                     "knn": {"idmm": {"b": 50.0}}}
    spec["report"] = {"pixel_floor": False, "decimals": 2}
    plan = build_plan(load(tmp_path, spec))
    rng = np.random.default_rng(0)
    truth: dict = {}  # (metric, row, dataset) -> [percent per seed with a result]
    for cell in plan.cells:
        if cell.name == "b/idmm/seed1":
            continue  # never run
        for kind, stage in cell.stages.items():
            if cell.name == "a/scratch/seed2":  # failed: a record, no result
                stage.run_dir.mkdir(parents=True)
                write_record(stage.run_dir, {"status": "failed", "attempts": [{"exit_code": 3}]})
                continue
            if kind == "eval":
                knn, lin = (float(v) for v in rng.uniform(0.2, 0.9, 2))
                _write(stage.run_dir / "eval_probe.json", {"knn_top1": knn, "linear_top1": lin, "knn_top5": 1.0})
                truth.setdefault(("knn", cell.row, cell.dataset), []).append(100.0 * knn)
                truth.setdefault(("linear", cell.row, cell.dataset), []).append(100.0 * lin)
            elif kind == "finetune":
                top1 = float(rng.uniform(0.2, 0.9))
                _write(stage.run_dir / "eval.json", {"top1": top1, "top5": 0.99, "step": 2})
                truth.setdefault(("finetune", cell.row, cell.dataset), []).append(100.0 * top1)
            else:  # a pre-training without data.val: no metric of its own
                (stage.run_dir).mkdir(parents=True, exist_ok=True)
                (stage.run_dir / "backbone.safetensors").write_bytes(b"x")
    return plan, truth


def test_tables_from_recorded_results(recorded):
    plan, truth = recorded
    report = write_report(plan, plots=False)
    rows = list(csv.DictReader(io.StringIO((report / "results.csv").read_text())))
    by_key = {(r["metric"], r["row"], r["dataset"]): r for r in rows}
    assert {k[0] for k in by_key} == {"finetune", "knn", "linear"}  # pretrain has no results here
    for key, values in truth.items():
        row = by_key[key]
        mean, std = _plain_mean_std(values)
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
        assert (row["std"] == "") if std is None else float(row["std"]) == pytest.approx(std, abs=1e-12)
        assert int(row["n"]) == len(values) and int(row["seeds"]) == 3
        assert [float(v.split(":")[1]) for v in row["values"].split(";")] == values  # every seed's value
    assert by_key[("finetune", "scratch", "a")]["missing"] == "2:finetune failed (exit code 3)"
    assert by_key[("finetune", "idmm", "b")]["missing"] == "1:pretrain not run"  # the first unfinished run
    assert by_key[("knn", "idmm", "b")]["missing"] == "1:pretrain not run"
    assert by_key[("finetune", "idmm", "a")]["paper"] == "79.9" and by_key[("knn", "idmm", "b")]["paper"] == "50.0"
    md = (report / "results.md").read_text()
    a_ft = truth[("finetune", "idmm", "a")]
    m, s = _plain_mean_std(a_ft)
    lines = md.splitlines()
    ft_table = lines[lines.index("## fine-tuning, top-1 (%)") + 2:]
    assert ft_table[0] == "| method | a | a (paper) | b |"
    idmm_line = next(ln for ln in ft_table if ln.startswith("| IDMM |"))
    b_ft = _plain_mean_std(truth[("finetune", "idmm", "b")])
    assert idmm_line == f"| IDMM | {m:.2f} ± {s:.2f} (n=3) | 79.9 | {b_ft[0]:.2f} ± {b_ft[1]:.2f} (n=2 of 3) |"
    scratch_line = next(ln for ln in ft_table if ln.startswith("| scratch |"))
    sa = _plain_mean_std(truth[("finetune", "scratch", "a")])
    sb = _plain_mean_std(truth[("finetune", "scratch", "b")])
    assert scratch_line == f"| scratch | {sa[0]:.2f} ± {sa[1]:.2f} (n=2 of 3) | 58.1 | {sb[0]:.2f} ± {sb[1]:.2f} (n=3) |"
    assert "- finetune: a/scratch/seed2: finetune failed (exit code 3)" in md
    assert "- knn: b/idmm/seed1: pretrain not run" in md and "Paper numbers: IDMM Table 2." in md


def test_a_row_without_any_result_is_missing_not_dropped(recorded):
    plan, truth = recorded
    for cell in plan.cells:
        if cell.method == "scratch" and cell.dataset == "b":
            (cell.stages["finetune"].run_dir / "eval.json").unlink()
    tables = collect(plan)
    entry = tables["finetune"][("scratch", None)]["b"]
    assert entry.n == 0 and sorted(entry.missing) == [0, 1, 2]
    md = (write_report(plan, plots=False) / "results.md").read_text()
    scratch_line = next(ln for ln in md.splitlines() if ln.startswith("| scratch |"))
    assert scratch_line.endswith("| missing (0/3) |")


def test_curves_and_bars_draw_what_was_recorded(recorded):
    plan, truth = recorded
    cell = plan.cells[0]  # a/idmm/seed0
    pre, ft = cell.stages["pretrain"], cell.stages["finetune"]
    rows = [{"step": 1, "kind": "train", "loss": 15.3}, {"step": 2, "kind": "train", "loss": 15.1},
            {"step": 2, "kind": "train", "loss": 15.0},  # the step repeated after a resume: the last counts
            {"step": 3, "kind": "train", "loss": 14.7}]
    (pre.run_dir / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 4, \"ki")
    _write(pre.run_dir / "run.json", {"num_samples": 2040, "num_classes": 10})
    ft_rows = [{"step": s, "kind": "train", "loss": 2.0 / s} for s in (1, 2)] + \
              [{"step": 2, "kind": "eval", "top1": 0.5, "top5": 0.9}]
    (ft.run_dir / "log.jsonl").write_text("\n".join(json.dumps(r) for r in ft_rows) + "\n")
    png = pre.run_dir.parent / "curves.png"
    panels = cell_curves(cell, png)
    assert panels["pretrain"]["series"] == {"loss": ([1, 2, 3], [15.3, 15.0, 14.7])}
    assert panels["pretrain"]["chance"] == 2 * math.log(2040)  # chance_line: 2*ln(N), N from run.json
    assert panels["finetune"]["series"] == {"loss": ([1, 2], [2.0, 1.0])}
    assert panels["finetune"]["top1"] == ([2], [50.0]) and panels["finetune"]["chance"] is None
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100  # two panels side by side
    tables = collect(plan)
    drawn = bar_chart(plan.experiment, "finetune", tables["finetune"], {}, png.with_name("bars.png"))
    for (row, ds), (mean, std) in drawn.items():
        assert (mean, std) == pytest.approx(_plain_mean_std(truth[("finetune", row, ds)]))
    assert len(drawn) == 4
    report = write_report(plan)  # the whole set of files
    assert sorted(p.name for p in report.glob("*.png")) == ["finetune.png", "knn.png", "linear.png"]
    assert (report / "curves" / "a__idmm__seed0.png").is_file()


# ------------------------------------------------------------------------------ pixel floor
def _decode_independently(shards: Path, max_id: int | None = None):
    """Plain reference: every PNG of every tar, in id order, pixels / 255."""
    samples = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    xs, ys, ids = [], [], []
    for parts in samples.values():
        idx = int(parts["idx"])
        if max_id is not None and idx >= max_id:
            continue
        img = Image.open(io.BytesIO(parts["png"])).convert("L")
        xs.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
        ys.append(int(parts["cls"]))
        ids.append(idx)
    order = np.argsort(ids)
    return np.stack(xs)[order], np.asarray(ys)[order]


def test_pixel_floor_equals_sklearn_on_independently_decoded_pixels(fmnist2k_shards, fmnist_test_shards_small,
                                                                     tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    cfg = PixelFloor(C=0.1, k=5, max_train=500)
    got = pixel_floor.cached_floor(tmp_path, "fm", str(fmnist2k_shards), str(fmnist_test_shards_small), cfg)
    x_tr, y_tr = _decode_independently(fmnist2k_shards, max_id=500)
    x_te, y_te = _decode_independently(fmnist_test_shards_small)
    lr = LogisticRegression(C=0.1, max_iter=1000).fit(x_tr, y_tr)
    knn = KNeighborsClassifier(n_neighbors=5).fit(x_tr, y_tr)
    assert (got["num_train"], got["num_test"], got["pixels"]) == (500, 500, "28x28 gray")
    assert got["knn_top1"] == float((knn.predict(x_te) == y_te).mean())
    assert got["logreg_top1"] == float((lr.predict(x_te) == y_te).mean())
    assert 0.6 < got["logreg_top1"] < 0.95 and 0.6 < got["knn_top1"] < 0.95  # a real floor, not chance
    # cached: the same inputs are not recomputed; other inputs are
    monkeypatch.setattr(pixel_floor, "compute_floor", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert pixel_floor.cached_floor(tmp_path, "fm", str(fmnist2k_shards), str(fmnist_test_shards_small), cfg) == got
    with pytest.raises(AssertionError, match="recomputed"):
        pixel_floor.cached_floor(tmp_path, "fm", str(fmnist2k_shards), str(fmnist_test_shards_small),
                                 PixelFloor(C=0.1, k=3, max_train=500))


def test_run_time_table_from_stage_records(recorded):
    plan, _ = recorded
    walls = {"a/idmm/seed0": [30.0, 90.0], "a/idmm/seed1": [60.0]}  # two attempts (resumed), one attempt
    for cell in plan.cells:
        if cell.name in walls:
            run = cell.stages["pretrain"]
            write_record(run.run_dir, {"status": "done", "attempts": [{"wall_s": w} for w in walls[cell.name]]})
    md = (write_report(plan, plots=False) / "results.md").read_text()
    assert "| idmm | pretrain | 2 | 1.5 |" in md  # (120 s + 60 s) / 2 runs
    assert "total 3.0 min" in md
