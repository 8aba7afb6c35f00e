"""The resolved run config: defaults -> recipe YAML -> `key=value` overrides, validated."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from dist_ssl.atomic import atomic_write_text
from dist_ssl.config.errors import ConfigError
from dist_ssl.config.overrides import apply_overrides, load_yaml
from dist_ssl.config.registry import sections
from dist_ssl.config.schema import doc, from_dict, to_dict


@dataclasses.dataclass
class RunBase:
    output_dir: Optional[str] = doc(None, "run directory: config.yaml, log.jsonl, checkpoints, eval.json")
    seed: int = doc(0, "global seed; every rank derives its own streams from it")
    resume: str = doc("auto", "'auto' = newest complete checkpoint in output_dir, 'none', or a path")

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir: required (where the run writes its files)")


def run_config_class() -> type:
    """RunBase plus one field per registered section (built on demand so that components
    registered later appear)."""
    extra = [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections().items()]
    return dataclasses.make_dataclass("RunConfig", extra, bases=(RunBase,))


def build_config(data: dict) -> Any:
    return from_dict(run_config_class(), data)


def load_config(recipe: str | Path | None, overrides: Iterable[str] = ()) -> Any:
    """Defaults -> recipe -> overrides -> validated RunConfig. Raises ConfigError (one line)."""
    data = load_yaml(recipe) if recipe is not None else {}
    return build_config(apply_overrides(data, overrides))


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_yaml(cfg))


def reload_saved_config(path: str | Path) -> Any:
    """Load a config.yaml written by save_config (no overrides)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (in saved config {path})") from None
