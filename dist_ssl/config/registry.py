"""Components register their own config sections, so the config system knows no component.

Two kinds of registration:

* a **section**: a top-level key of the run config with its dataclass, e.g.
  ``register_section("optim", OptimConfig)`` -> ``cfg.optim``.
* a **variant**: one concrete dataclass of a polymorphic section, chosen by the section's
  ``name`` key, e.g. every pretext method registers ``register_variant(MethodConfig, "idmm")``
  on its own ``IDMMConfig(MethodConfig)``; a recipe then says ``method: {name: idmm, ...}``.

Modules that register sections are imported lazily by name (see ``BUILTIN_SECTION_MODULES``)
so that ``dist_ssl.config`` imports nothing above it. They hold only config dataclasses, next to
the code they configure, and import neither torch nor timm nor accelerate: loading, printing or
submitting a run config stays a fraction of a second (tests/unit/test_config_imports.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, TypeVar

from dist_ssl.config.errors import ConfigError, nearest_key

T = TypeVar("T")

_SECTIONS: dict[str, type] = {}
_VARIANTS: dict[type, dict[str, type]] = {}

# Modules whose import registers the built-in sections and variants (each one torch-free). A
# module missing here is simply not registered yet (later issues add theirs).
BUILTIN_SECTION_MODULES = (
    "dist_ssl.config.sections",
    "dist_ssl.models.config",
    "dist_ssl.engine.optim_config",
    "dist_ssl.engine.metrics.config",
    "dist_ssl.parallel.config",
    "dist_ssl.methods.configs",
)


def register_section(name: str, cls: type) -> type:
    """Add top-level section `name` with dataclass `cls` to every run config."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"section {name!r}: {cls!r} is not a dataclass")
    previous = _SECTIONS.get(name)
    if previous is not None and previous is not cls:
        raise ValueError(f"config section {name!r} is already registered by {previous.__qualname__}")
    _SECTIONS[name] = cls
    return cls


def register_variant(base: type, name: str) -> Callable[[T], T]:
    """Class decorator: make `cls` the concrete config of `base` when `name: <name>`."""

    def wrap(cls: T) -> T:
        variants = _VARIANTS.setdefault(base, {})
        if name in variants and variants[name] is not cls:
            raise ValueError(f"{base.__name__} variant {name!r} is already registered")
        variants[name] = cls
        return cls

    return wrap


# The built-in sections' order in a resolved config (config.yaml, the experiment runner's
# fingerprint): fixed, not the import order, which differs between a trainer process and one that
# imported a model or method module first.
SECTION_ORDER = ("data", "train", "ckpt", "model", "optim", "metrics", "parallel", "method")


def sections() -> dict[str, type]:
    """Registered sections: the built-ins in SECTION_ORDER, then others in registration order."""
    load_builtin_sections()
    ordered = {name: _SECTIONS[name] for name in SECTION_ORDER if name in _SECTIONS}
    return ordered | {name: cls for name, cls in _SECTIONS.items() if name not in ordered}


def variant_sections() -> set[str]:
    """Top-level section names whose dataclass is a variant base (chosen by `name`)."""
    return {name for name, cls in sections().items() if cls in _VARIANTS}


def variants(base: type) -> dict[str, type]:
    return dict(_VARIANTS.get(base, {}))


def resolve_variant(cls: type, data: dict, path: str) -> type:
    """The concrete dataclass for `data` when `cls` is a variant base, else `cls` itself."""
    registered = _VARIANTS.get(cls)
    if registered is None:
        return cls
    name = data.get("name", _default_name(cls))
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none registered"
        raise ConfigError(f"{path}.name" if path else "name",
                          f"unknown {cls.__name__} {name!r}; known: {known}"
                          + nearest_key(str(name), registered))
    return registered[name]


def _default_name(cls: type) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == "name":
            return f.default
    raise TypeError(f"variant base {cls.__name__} needs a 'name' field")


def load_builtin_sections() -> None:
    for module in BUILTIN_SECTION_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only "this component does not exist (yet)" is tolerated, never a broken import
            # inside an existing module.
            if exc.name is None or not module.startswith(exc.name):
                raise
