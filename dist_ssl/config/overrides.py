"""Recipe YAML + `dotted.key=value` command-line overrides -> one nested dict."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from dist_ssl.config.errors import ConfigError

BASE_KEY = "_base_"  # a recipe may name another recipe (relative path) that it extends


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names a key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: str, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line
        super().__init__(f"duplicate key {key} on lines {first_line} and {line}")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: plain PyYAML reads `5e-4` (no dot) as a
    string, which would make `base_lr: 5e-4` a type error; and a duplicate key is an error
    (two `train:` blocks would otherwise silently drop the first)."""

    def construct_document(self, node):
        _check_duplicate_keys(node, "")
        return super().construct_document(node)


def _check_duplicate_keys(node: yaml.Node, path: str) -> None:
    """Raise DuplicateKeyError for the first key repeated in any mapping under ``node``."""
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _check_duplicate_keys(child, f"{path}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        key = f"{path}.{key_node.value}" if path else key_node.value
        line = key_node.start_mark.line + 1
        if (key_node.tag, key_node.value) in first:
            raise DuplicateKeyError(key, first[key_node.tag, key_node.value], line)
        first[key_node.tag, key_node.value] = line
        _check_duplicate_keys(value_node, key)


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
    except DuplicateKeyError as exc:
        raise ConfigError(exc.key, f"given twice in {path} (lines {exc.first_line} and {exc.line}); "
                          f"YAML would keep only the last: merge them into one") from None
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
    if _has_comment(raw):
        return parts, raw.strip()  # a value is one argument: its '#' is data, not a YAML comment
    try:
        value = safe_load(raw) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(key, f"override {text!r} gives {exc.key} twice") from None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return parts, value


def _has_comment(raw: str) -> bool:
    """Whether YAML would read part of ``raw`` as a comment (a '#' outside every token: at the
    start or after a space, unquoted), which it would silently drop: `x=/runs/a #3` -> '/runs/a'."""
    if "#" not in raw:
        return False
    try:
        spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(raw, Loader=RecipeLoader)]
    except yaml.YAMLError:
        return False  # not YAML: kept literally anyway
    return any(ch == "#" and not any(a <= i < b for a, b in spans) for i, ch in enumerate(raw))


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
