"""Submitting a training run to SLURM: validate the recipe + overrides of every element, find
the launcher config and the cluster's env file, write the batch script into the run directory and
run sbatch. The command line is cli_submit.py (``dist-ssl-submit``); the experiment runner's
``submit`` uses the same pieces.

``--array KEY=v1,v2`` (repeatable: the cartesian product) makes a job array, element ``i`` in
``<output_dir>/<i>/`` with ``<output_dir>/slurm/array.json`` listing each element's overrides;
``--after JOBID`` chains with ``--dependency=afterok`` (an array id waits for all its elements).
Everything reaches sbatch as an argv list and the script as quoted words (see sbatch.py).

Files named by a short name (``--env-file local_cpu``, the default launcher config of a
``parallel.backend``) are looked up beside the recipe (its folder and each folder above it), then
in the working directory: never through the package's own location, which is somewhere in
site-packages once installed.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from dist_ssl.atomic import atomic_write_bytes, atomic_write_json
from dist_ssl.errors import UserError
from dist_ssl.slurm.sbatch import Element, JobSpec, log_dir

ENV_DIR = Path("slurm_setup") / "env"  # per-cluster environment files, in a checkout
LAUNCH_CONFIG_DIR = Path("recipes") / "accelerate"  # accelerate launcher configs, in a checkout
# parallel.backend -> launcher config (recipes/accelerate/), when --accelerate-config is not given
_BACKEND_CONFIG = {"auto": "ddp", "ddp": "ddp", "fsdp2": "fsdp2", "zero1": "zero1", "zero2": "zero2",
                   "zero3": "zero3"}


class SubmitError(UserError):
    """A bad argument or a failed submission: one line for the user."""




def split_values(text: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def array_overrides(specs: list[str]) -> list[tuple[str, ...]]:
    """['seed=0,1', 'lr=a,b'] -> [('seed=0', 'lr=a'), ('seed=0', 'lr=b'), ...]; [()] without arrays."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values:
            raise SubmitError(f"--array {spec!r}: expected KEY=v1,v2,...")
        axes.append([f"{key.strip()}={v}" for v in split_values(values)])
    return [tuple(combo) for combo in itertools.product(*axes)]




def _load(recipe: Path, overrides: list[str]):
    from dist_ssl.config import ConfigError, load_config

    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None


def plan_elements(recipe: Path, overrides: list[str], arrays: list[str]) -> tuple[list[Element], object]:
    """Validate every element's config; pin each run directory as an absolute output_dir."""
    base = _load(recipe, overrides)
    combos = array_overrides(arrays)
    if not arrays:
        run_dir = Path(base.output_dir).resolve()
        return [Element(run_dir, (*overrides, f"output_dir={run_dir}"))], base
    parent = Path(base.output_dir).resolve()
    elements = []
    for i, combo in enumerate(combos):
        run_dir = parent / str(i)
        el_overrides = (*overrides, *combo, f"output_dir={run_dir}")
        _load(recipe, list(el_overrides))
        elements.append(Element(run_dir, el_overrides))
    return elements, base







def find_near(relative: Path, *anchors: Path) -> Optional[Path]:
    """``relative`` under the folder of an anchor file (a recipe, an experiment file) or a folder
    above it, so a file inside a checkout finds the checkout's files; else under the working
    directory. None if nowhere."""
    folders = [folder for anchor in anchors for folder in Path(anchor).resolve().parents]
    for folder in (*dict.fromkeys(folders), Path.cwd()):
        if (folder / relative).is_file():
            return folder / relative
    return None


def resolve_env_file(value: Optional[str], *anchors: Path) -> Optional[Path]:
    """``--env-file``: a path, or a name in slurm_setup/env/ found from ``anchors`` (find_near)."""
    if not value:
        return None
    path = Path(value)
    if not path.is_file() and "/" not in value:
        path = find_near(ENV_DIR / (value if value.endswith(".sh") else value + ".sh"), *anchors) or path
    if not path.is_file():
        raise SubmitError(f"--env-file: no such file {value!r} (nor in {ENV_DIR}/ above "
                          f"{Path(anchors[0]).parent if anchors else '-'} or in the working directory)")
    return path.resolve()


def default_accelerate_config(backend: str, *anchors: Path) -> Path:
    """The launcher config of a ``parallel.backend`` (ddp for auto): recipes/accelerate/<name>.yaml
    found from ``anchors`` (find_near); the relative path when nowhere (callers say so)."""
    relative = LAUNCH_CONFIG_DIR / f"{_BACKEND_CONFIG[backend]}.yaml"
    return find_near(relative, *anchors) or relative


def accelerate_config(value: Optional[str], cfg, recipe: Path) -> Path:
    path = Path(value) if value else default_accelerate_config(cfg.parallel.backend, recipe)
    if not path.is_file():
        raise SubmitError(f"--accelerate-config: no such file {path}")
    return path.resolve()

def sbatch_argv(spec: JobSpec, after: list[str]) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if after:
        # a failed prerequisite cancels this job instead of leaving it pending forever
        argv += ["--dependency=afterok:" + ":".join(after), "--kill-on-invalid-dep=yes"]
    return argv + [str(spec.script_path)]


def write_files(spec: JobSpec, env_file: Optional[Path], text: str) -> None:
    """Only inside the run directories: the script, the env copy, element log dirs, array.json."""
    spec.script_path.parent.mkdir(parents=True, exist_ok=True)
    for el in spec.elements:
        log_dir(el.run_dir).mkdir(parents=True, exist_ok=True)  # SLURM opens the log, never mkdirs
    if env_file is not None:
        atomic_write_bytes(spec.env_file, env_file.read_bytes())
    if spec.array:
        atomic_write_json(spec.script_path.parent / "array.json",
                          [{"index": i, "run_dir": str(el.run_dir), "overrides": list(el.overrides)}
                           for i, el in enumerate(spec.elements)])
    atomic_write_bytes(spec.script_path, text.encode("utf-8"))


def submit(argv: list[str]) -> str:
    """Run sbatch; the job id."""
    if shutil.which(argv[0]) is None:
        raise SubmitError("sbatch not found: is this a SLURM login node? (--dry-run works anywhere)")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch did not answer within 120 s") from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
