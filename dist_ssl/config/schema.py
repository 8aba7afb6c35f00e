"""Typed dataclass configs: build them from plain dicts with full-key-path errors, and back.

Convention for every config dataclass in the project (each field documented by ``doc()``, the one
way to give a field its one-line help)::

    @dataclass
    class OptimConfig:
        base_lr: float = doc(5e-4, "lr per 256 images; scaled by global batch / 256")

        def validate(self) -> None:          # optional
            if self.base_lr <= 0:
                raise ValueError("base_lr: must be > 0")

Supported field types: int, float, bool, str, Any, Optional[X], list[X], tuple[X, ...],
tuple[X, Y], dict[str, X], Literal[...], nested dataclasses, and "variant" dataclasses (see
registry.py) whose concrete class is chosen by their ``name`` key. A float is always finite
(NaN / inf are errors). A ``(lo, hi)`` range field declares its bounds once,
``doc((0.08, 1.0), "crop area range", interval=(0.0, 1.0))``, and is checked for every config
(``a < lo <= hi <= b``) before its ``validate()`` runs.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from dist_ssl.config.errors import ConfigError, nearest_key
from dist_ssl.config.registry import resolve_variant


def doc(default: Any = dataclasses.MISSING, help: str = "", *,
        interval: tuple[float, float] | None = None, **kwargs: Any) -> Any:
    """`dataclasses.field` with a one-line doc; lists/dicts become default factories.

    ``interval=(a, b)``: the field is a (lo, hi) range that must satisfy a < lo <= hi <= b.
    """
    metadata = {"help": help} if interval is None else {"help": help, "interval": interval}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value),
                                 metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def field_help(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"must be one of {choices}, got {value!r}"
                              + nearest_key(str(value), [str(a) for a in args]))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _convert_container(value, tp, origin or tp, args, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported config type {_type_name(tp)}")


def _convert_container(value: Any, tp: Any, origin: Any, args: tuple, path: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        vtp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vtp, f"{path}[{k}]") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {value!r}")
    if origin is list:
        etp = args[0] if args else Any
        return [_convert(v, etp, f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(path, f"expected {len(args)} values, got {len(value)}: {value!r}")
    etps = args or (Any,) * len(value)
    return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, etps)))


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys, wrong types and invalid values raise
    ConfigError naming the full key path (and the nearest valid key for a typo)."""
    obj = _build(cls, data, path)
    validate_tree(obj, path)
    return obj


def _build(cls: type, data: dict, path: str) -> Any:
    cls = resolve_variant(cls, data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_join(path, str(key)), "unknown key" + nearest_key(str(key), fields))
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in data.items()}
    for key in fields.keys() - kwargs.keys():
        # absent sections are built from {} so a variant base resolves to its default variant
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], {}, _join(path, key))
    return cls(**kwargs)


def validate_tree(obj: Any, path: str = "") -> None:
    """Run `validate()` of a dataclass and of every nested section, innermost first, so
    defaults that were never written in a recipe are checked too."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_tree(value, _join(path, f.name))
        if "interval" in f.metadata and value is not None:
            _check_interval(value, f.metadata["interval"], _join(path, f.name))
    check = getattr(obj, "validate", None)
    if check is None:
        return
    try:
        check()
    except ValueError as exc:
        msg = str(exc)
        key, sep, rest = msg.partition(": ")
        if sep and key.replace(".", "").replace("_", "").isalnum() and " " not in key:
            raise ConfigError(_join(path, key), rest) from None
        raise ConfigError(path or "<config>", msg) from None


def _check_interval(value: Any, bounds: tuple[float, float], path: str) -> None:
    lo, hi = value
    if not bounds[0] < lo <= hi <= bounds[1]:
        order = " (reversed?)" if lo > hi else ""
        raise ConfigError(path, f"must be a range [lo, hi] with {bounds[0]:g} < lo <= hi <= "
                                f"{bounds[1]:g}, got {list(value)}{order}")


def to_dict(obj: Any) -> Any:
    """Plain YAML-able structure (tuples become lists) of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
