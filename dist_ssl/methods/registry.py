"""Methods register by name; the engine builds them from ``cfg.method.name`` only."""
from __future__ import annotations

from typing import Callable, TypeVar

from dist_ssl.config.registry import register_variant
from dist_ssl.methods.base import Method, MethodConfig, MethodContext

M = TypeVar("M", bound=type[Method])
_METHODS: dict[str, type[Method]] = {}


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


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(cfg: MethodConfig, ctx: MethodContext) -> Method:
    try:
        cls = _METHODS[cfg.name]
    except KeyError:
        raise KeyError(f"method.name: unknown method {cfg.name!r}; known: {', '.join(method_names())}") from None
    return cls(cfg, ctx)
