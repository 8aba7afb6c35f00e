"""Training methods, one file each, registered by name (see base.py for the interface)."""
from dist_ssl.config.registry import register_section
from dist_ssl.methods.base import Method, MethodConfig, MethodContext
from dist_ssl.methods.registry import build_method, method_names, register_method

# Importing a method module registers it (and its config variant).
from dist_ssl.methods import supervised  # noqa: E402,F401
from dist_ssl.methods import beit  # noqa: E402,F401
from dist_ssl.methods import splitmask  # noqa: E402,F401
from dist_ssl.methods import mae  # noqa: E402,F401
from dist_ssl.methods import simclr  # noqa: E402,F401
from dist_ssl.methods import supcon  # noqa: E402,F401
from dist_ssl.methods import moco_v2  # noqa: E402,F401
from dist_ssl.methods import moco_v3  # noqa: E402,F401
from dist_ssl.methods import dino  # noqa: E402,F401
from dist_ssl.methods import idmm  # noqa: E402,F401

register_section("method", MethodConfig)

__all__ = ["Method", "MethodConfig", "MethodContext", "build_method", "method_names", "register_method"]
