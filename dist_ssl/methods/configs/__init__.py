"""Every built-in method's typed config, one module per method, named like the method's own
module: ``configs/idmm.py`` holds ``IDMMConfig`` of ``methods/idmm.py``.

Torch-free: the run config imports this package to know every ``method.name`` and its keys,
without importing a single method (each imports torch, timm and its model code). The method
registry finds a built-in method's module from its config's module name (``methods/registry.py``).
A new method adds its config module here and its method module beside ``registry.py``.
"""
from dist_ssl.methods.configs import (  # noqa: F401  (each registers its config variant)
    beit,
    dino,
    idmm,
    mae,
    moco_v2,
    moco_v3,
    simclr,
    splitmask,
    supcon,
    supervised,
)
from dist_ssl.methods.configs.base import MethodConfig

__all__ = ["MethodConfig"]
