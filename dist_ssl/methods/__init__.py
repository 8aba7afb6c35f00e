"""Training methods, one file each, registered by name (see base.py for the interface).

Importing this package is cheap: it registers every built-in method's config (``configs/``,
torch-free) so recipes can name them; a method's own module (torch, timm, its model code) is
imported when the method is built (``registry.build_method``) or by ``import_builtin_methods()``.
``Method`` and ``MethodContext`` come from base.py on first use for the same reason.
"""
from dist_ssl.methods.configs import MethodConfig
from dist_ssl.methods.registry import build_method, import_builtin_methods, method_names, register_method

__all__ = ["Method", "MethodConfig", "MethodContext", "build_method", "import_builtin_methods", "method_names",
           "register_method"]


def __getattr__(name: str):
    if name in ("Method", "MethodContext"):
        from dist_ssl.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
