"""Golden losses: a short deterministic run per registered method against tests/golden/<method>.json.

Each run: the tiny build of tests/unit/_tiny_methods.py (seed 0, no drop path, CPU float32),
4 AdamW steps on fixed random views (one seeded batch per step), ``after_step`` as the engine
calls it. Every step's loss and logged parts are compared with the file, so a change to a loss,
a head, an initialisation, a schedule, a mask or a post-step update that moves the numbers fails
here even when every smoke and reference test still passes.

Tolerance: relative 1e-4 (absolute 1e-6 near zero). Measured here: two runs on one machine are
bit-identical; 2 threads instead of CI's 1 (float32 sums reordered, as another CPU's kernels may
do) move them by up to 6e-6 relative. Real changes move them far more: SimCLR's temperature x 1.01
moved every step by ~6e-3, DINO's momentum schedule one step late moved step 1 by 4e-3 (each
watched failing here).

After an intended numeric change, regenerate and review the diff:

    DIST_SSL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden_losses.py
    git diff tests/golden

In that mode every test rewrites its file and then FAILS (so that it can never pass in CI with the
variable set); run again without it to see them pass.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from _tiny_methods import B, build_tiny, tiny_batch, tiny_config, tiny_model_config, trainable

from dist_ssl.methods import method_names

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("DIST_SSL_UPDATE_GOLDEN") == "1"
REGENERATE = "DIST_SSL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden_losses.py"
RTOL, ATOL = 1e-4, 1e-6
STEPS, LR = 4, 1e-3


def settings(name: str) -> dict:
    """Everything the numbers depend on that the test chooses (stored with them)."""
    return {"method": tiny_config(name), "model": tiny_model_config(name, drop_path=0.0), "seed": 0,
            "batch_size": B, "steps": STEPS, "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": 0.0},
            "batch_seeds": [100 + step for step in range(STEPS)]}


def golden_run(name: str) -> list[dict[str, float]]:
    """Per step: the loss and every logged part, as floats."""
    method = build_tiny(name, seed=0, drop_path=0.0)
    opt = torch.optim.AdamW([p for _, p in trainable(method)], lr=LR, weight_decay=0.0)
    rows = []
    for step in range(STEPS):
        out = method(tiny_batch(method, seed=100 + step), step=step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_step(step + 1)  # as the engine: after the optimizer step, with the new step count
        rows.append({"loss": out["loss"].item(), **{k: float(v) for k, v in sorted(out["logs"].items())}})
    return rows


def drift(got: list[dict[str, float]], want: list[dict[str, float]]) -> list[str]:
    """Human-readable differences beyond the tolerance, first step first."""
    if [sorted(r) for r in got] != [sorted(r) for r in want]:
        return [f"logged names/steps changed: {[sorted(r) for r in got]} vs {[sorted(r) for r in want]}"]
    return [f"step {step} {key}: {row[key]!r} vs golden {want[step][key]!r}"
            for step, row in enumerate(got) for key in row
            if not math.isclose(row[key], want[step][key], rel_tol=RTOL, abs_tol=ATOL)]


@pytest.mark.parametrize("name", method_names())
def test_losses_match_the_golden_file(name):
    path = GOLDEN_DIR / f"{name}.json"
    got = golden_run(name)
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        rows = ",\n".join(f"  {json.dumps(row)}" for row in got)  # one line per step: readable diffs
        path.write_text(f'{{\n "settings": {json.dumps(settings(name))},\n "steps": [\n{rows}\n ]\n}}\n')
        pytest.fail(f"{path} rewritten (DIST_SSL_UPDATE_GOLDEN=1): review `git diff {GOLDEN_DIR}`, "
                    f"then run without the variable", pytrace=False)
    if not path.is_file():
        pytest.fail(f"no golden losses for {name!r} ({path}); create them with: {REGENERATE}", pytrace=False)
    golden = json.loads(path.read_text())
    assert golden["settings"] == settings(name), f"the golden run's settings changed; regenerate: {REGENERATE}"
    problems = drift(got, golden["steps"])
    assert not problems, f"{name} drifted from {path.name} (rtol {RTOL}):\n" + "\n".join(problems[:10])


def test_every_golden_file_is_a_registered_method():
    stale = sorted(p.stem for p in GOLDEN_DIR.glob("*.json") if p.stem not in method_names())
    assert not stale, f"golden files of unregistered methods: {stale} (delete them from {GOLDEN_DIR})"
