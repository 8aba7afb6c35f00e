"""Is a stage run done, to do, or stale? And its record, ``<run dir>/stage.json``.

Done means the run's final result exists: ``eval.json`` for a training run with ``data.val``
(the trainer writes it last), else ``backbone.safetensors`` (written after the last
checkpoint); ``eval_probe.json`` for an evaluation. A run that is not done is (re)launched: the
trainer's ``resume=auto`` continues from its newest checkpoint.

Stale means the directory holds work that no longer matches the experiment, which the runner
never silently reuses nor overwrites:
- the record's resolved config differs from today's (the experiment or a recipe changed) and
  the run has progress (a checkpoint or its result; a run that failed before its first
  checkpoint is simply relaunched);
- the run is done but its upstream run's result changed since it started (the upstream re-ran).

``stage.json`` (written atomically): the command, cwd, environment, resolved config, the
upstream result it started from, the status (running / done / failed / interrupted) and one
entry per attempt (start, end, exit code, wall seconds).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from dist_ssl.atomic import atomic_write_json
from dist_ssl.experiments.cells import EVAL_OUT, StageRun

from dist_ssl.run_files import BACKBONE_FILE, CHECKPOINTS_DIR, EVAL_FILE
from dist_ssl.run_files import STAGE_LOG_FILE as LOG_FILE, STAGE_STATUS_FILE as STATUS_FILE


@dataclass
class Resolved:
    """What the runner resolved for a stage before launching it."""
    config: str = ""                   # train: the resolved config YAML; eval: its arguments
    artifact: Optional[Path] = None    # the file whose existence means done
    error: str = ""                    # invalid: one line (e.g. a bad override)
    backend: str = "auto"              # parallel.backend (picks the SLURM launcher config)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.config.encode("utf-8")).hexdigest()


def resolve(stage: StageRun) -> Resolved:
    """Resolve a training stage's config (recipe + overrides, as train.py will) or an evaluation's
    arguments. A config error makes the stage invalid, with train.py's own one-line message."""
    if stage.is_eval:
        return Resolved(config="\n".join(stage.args), artifact=stage.run_dir / EVAL_OUT)
    from dist_ssl.config import ConfigError, config_to_yaml, load_config  # imports torch

    try:
        cfg = load_config(stage.recipe, stage.args)
    except ConfigError as exc:
        return Resolved(error=f"train.py: error: {exc}")
    final = EVAL_FILE if cfg.data.val else BACKBONE_FILE
    return Resolved(config=config_to_yaml(cfg), artifact=stage.run_dir / final, backend=cfg.parallel.backend)


def read_record(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(run_dir: Path, record: dict) -> None:
    atomic_write_json(run_dir / STATUS_FILE, record, durable=False)


def artifact_stamp(path: Optional[Path]) -> Optional[int]:
    """Identity of a result file: its modification time in ns (None when missing)."""
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _has_progress(stage: StageRun, resolved: Resolved) -> bool:
    ckpts = stage.run_dir / CHECKPOINTS_DIR
    return resolved.artifact.is_file() or (ckpts.is_dir() and any(ckpts.glob("step_*")))


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(old: str, new: str) -> tuple[list[str], bool]:
    """(keys whose value differs, whether every one is only a key added since the old config)."""
    try:
        a, b = _flat(yaml.safe_load(old)), _flat(yaml.safe_load(new))
    except yaml.YAMLError:
        return ["(unreadable)"], False
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) or type(a.get(k)) is not type(b.get(k)))
    if keys or old == new:
        return keys, bool(keys) and all(k not in a for k in keys)
    # Equal values, other text (e.g. key order): name the first line that differs.
    first = next((o, n) for o, n in zip(old.splitlines() + [""], new.splitlines() + [""]) if o != n)
    return [f"line {first[0]!r} -> {first[1]!r}"], False


def state(stage: StageRun, resolved: Resolved, upstream: Optional[Resolved]) -> tuple[str, str]:
    """('done' | 'todo' | 'stale' | 'invalid', reason)."""
    if resolved.error:
        return "invalid", resolved.error
    record = read_record(stage.run_dir)
    if record and record.get("fingerprint") not in (None, resolved.fingerprint) and \
            _has_progress(stage, resolved):
        keys, added_only = (_changed_keys(record.get("config", ""), resolved.config) if not stage.is_eval
                            else (["arguments"], False))
        # Config keys added to dist_ssl since the run (new fields, whose defaults keep the old
        # behaviour) do not make its work another config; a changed or removed key does.
        if not added_only:
            return "stale", (f"{stage.run_dir} holds a run made with another config (changed: "
                             f"{', '.join(keys[:6]) or '?'}); delete the directory to redo it, or "
                             "restore the experiment file / recipe")
    if not resolved.artifact.is_file():
        return "todo", ""
    started_from = (record or {}).get("upstream_stamp")
    if upstream is not None and started_from is not None and \
            artifact_stamp(upstream.artifact) != started_from:
        return "stale", (f"{stage.run_dir} was made from an earlier result of {stage.upstream.run_dir}, "
                         "which re-ran since; delete the directory to redo it")
    return "done", ""
