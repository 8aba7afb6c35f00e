"""Loading, printing and submitting a run config imports no torch, timm, accelerate, DeepSpeed or
method module (config modules are torch-free; a method's module is imported when it is built),
and the resolved text is the same whatever else a process imported before.

Each case runs in a fresh interpreter: this test process has imported torch long ago.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_ssl.config import config_to_yaml, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
# accelerate/: launcher configs; experiments/: experiment files, not run configs
ALL = sorted(str(p) for p in RECIPES.rglob("*.yaml")
             if not {"accelerate", "experiments"} & set(p.relative_to(RECIPES).parts))
RECIPE = str(RECIPES / "idmm_fmnist2k.yaml")
OVERRIDES = ["train.epochs=3", "model.name=vit_pico", "method.label_smoothing=0.2", "parallel.backend=ddp"]
HEAVY = ("torch", "timm", "accelerate", "deepspeed")

# In a fresh interpreter: every recipe's resolved text, `tools/train.py --print-config` and
# `tools/submit.py --dry-run` (config -> SLURM batch script), then what got imported.
LIGHT_PROBE = """
import contextlib, io, json, sys
from dist_ssl.slurm.cli_submit import main as submit_main
from dist_ssl.config import config_to_yaml, load_config
from dist_ssl.engine.cli_train import main as train_main
from dist_ssl.methods import method_names

recipes, recipe, overrides, out_dir, heavy = json.loads(sys.argv[1])
texts = {r: config_to_yaml(load_config(r)) for r in recipes}
with contextlib.redirect_stdout(io.StringIO()) as printed:
    train_code = train_main(["--print-config", recipe, *overrides])
with contextlib.redirect_stdout(io.StringIO()) as script:
    submit_code = submit_main([recipe, *overrides, f"output_dir={out_dir}", "--nodes", "2", "--dry-run"])
imported = sorted(m for m in sys.modules if m.split(".")[0] in heavy or (
    m.startswith("dist_ssl.methods.") and m.split(".")[2] not in ("configs", "registry")))
json.dump({"texts": texts, "printed": printed.getvalue(), "train_code": train_code, "submit_code": submit_code,
           "script": script.getvalue(), "methods": method_names(), "imported": imported}, sys.stdout)
"""

# The same texts after importing every method, model and engine module first (the section
# order then differs from the registration order of a config-only process).
HEAVY_PROBE = """
import json, sys
import dist_ssl.methods.idmm
from dist_ssl.methods import import_builtin_methods
import_builtin_methods()
import dist_ssl.engine.optim, dist_ssl.engine.trainer, dist_ssl.models.factory, dist_ssl.parallel.accelerator
from dist_ssl.config import config_to_yaml, load_config

recipes = json.loads(sys.argv[1])
json.dump({r: config_to_yaml(load_config(r)) for r in recipes}, sys.stdout)
"""


def _probe(code: str, arg: object) -> object:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_load_print_and_submit_a_config_without_torch_or_any_method(tmp_path):
    light = _probe(LIGHT_PROBE, [ALL, RECIPE, OVERRIDES, str(tmp_path / "run"), HEAVY])
    assert light["imported"] == [], "loading a config imported these"
    assert (light["train_code"], light["submit_code"]) == (0, 0)
    assert light["printed"] == config_to_yaml(load_config(RECIPE, OVERRIDES))
    assert "epochs: 3" in light["printed"] and "label_smoothing: 0.2" in light["printed"]
    assert "#SBATCH --nodes=2" in light["script"] and "train.epochs=3" in light["script"]
    assert {"beit", "dino", "idmm", "mae", "mocov2", "mocov3", "simclr", "splitmask", "supcon",
            "supervised"} <= set(light["methods"])  # every built-in listed, none imported
    # the text the experiment runner fingerprints does not depend on what a process imported
    assert _probe(HEAVY_PROBE, ALL) == light["texts"]
