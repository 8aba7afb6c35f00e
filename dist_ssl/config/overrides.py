"""Recipe YAML + `dotted.key=value` command-line overrides -> one nested dict."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from dist_ssl.config.errors import ConfigError

BASE_KEY = "_base_"  # a recipe may name another recipe (relative path) that it extends


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: plain PyYAML reads `5e-4` (no dot) as a
    string, which would make `base_lr: 5e-4` a type error."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str) -> object:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def load_yaml(path: str | Path) -> dict:
    """Read a recipe with the safe loader, following `_base_:` chains."""
    return _load_yaml(Path(path), seen=())


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(BASE_KEY, f"recipe {path} extends itself (cycle via {seen[-1]})")
    if not path.is_file():
        raise ConfigError("", f"recipe file not found: {path}")
    try:
        data = safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError("", f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(BASE_KEY, f"expected a recipe path, got {base!r}")
    parent = _load_yaml(path.parent / base, seen + (path,))
    return merge(parent, data)


def merge(base: dict, update: dict, _top: bool = True) -> dict:
    """Recursive dict merge; `update` wins. When a recipe switches a variant section (e.g.
    `method.name`), the base's other keys of that section are dropped: they belong to the
    old variant."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if _top and _switches_variant(key, old, value.get("name")):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = merge(old, value, _top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _switches_variant(section: str, old: dict, new_name: object) -> bool:
    from dist_ssl.config.registry import variant_sections

    return (new_name is not None and "name" in old and old["name"] != new_name
            and section in variant_sections())


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as a YAML scalar or list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"override {text!r} is not of the form dotted.key=value")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(key, f"override {text!r} has an empty key part")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply each override in order; unknown keys are caught later by the typed build."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]),
                                  f"is a value ({child!r}), cannot set {'.'.join(parts)}")
            node = child
        if len(parts) == 2 and parts[1] == "name" and _switches_variant(parts[0], node, value):
            # switching a variant (e.g. method.name) drops the old variant's keys
            node.clear()
        node[parts[-1]] = value
    return out
