"""Methods register by name; the engine builds them from ``cfg.method.name`` only.

A built-in method's module is imported when the method is first built, not before: the run
config knows every method from its torch-free config (``methods/configs/``), and the module that
implements it is named like that config's module (``configs/idmm.py`` -> ``methods/idmm.py``).
``import_builtin_methods()`` imports them all, for tests and tools that iterate the registry.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, TypeVar

from dist_ssl.config.registry import register_variant, variants
from dist_ssl.methods.configs import MethodConfig

if TYPE_CHECKING:  # base.py imports torch; the registry must not (method_names() serves the config)
    from dist_ssl.methods.base import Method, MethodContext

M = TypeVar("M", bound="type[Method]")
_METHODS: dict[str, type[Method]] = {}
_CONFIGS_PACKAGE = "dist_ssl.methods.configs."


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: ``@register_method("idmm")`` on a Method whose ``config_class``
    subclasses MethodConfig; also registers the config variant for recipes."""

    def wrap(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        if not issubclass(cls.config_class, MethodConfig) or cls.config_class is MethodConfig:
            raise TypeError(f"method {name!r}: config_class must subclass MethodConfig")
        register_variant(MethodConfig, name)(cls.config_class)
        _METHODS[name] = cls
        return cls

    return wrap


def _builtin_module(name: str) -> str | None:
    """The module implementing built-in method ``name``, from its config's module name."""
    config = variants(MethodConfig).get(name)
    if config is None or not config.__module__.startswith(_CONFIGS_PACKAGE):
        return None
    return "dist_ssl.methods." + config.__module__.removeprefix(_CONFIGS_PACKAGE)


def method_names() -> list[str]:
    """Every built-in method (imported or not) and every other registered one."""
    return sorted(set(_METHODS) | {name for name in variants(MethodConfig) if _builtin_module(name)})


def method_class(name: str) -> type[Method]:
    """The Method registered as ``name``, importing its built-in module on first use."""
    module = _builtin_module(name)
    if name not in _METHODS and module is not None:
        importlib.import_module(module)  # registers it (@register_method)
        if name not in _METHODS:
            raise KeyError(f"method.name: {module} does not register method {name!r} (@register_method)")
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"method.name: unknown method {name!r}; known: {', '.join(method_names())}") from None


def import_builtin_methods() -> None:
    """Import (and so register) every built-in method, e.g. to iterate over their classes."""
    for name in method_names():
        method_class(name)


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    return method_class(cfg.name)(cfg, ctx)
