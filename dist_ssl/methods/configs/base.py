"""``MethodConfig``: the variant base of the run config's ``method`` section.

A recipe says ``method: {name: <registered name>, ...}``; the name picks the concrete config
class, one per method in this folder, registered with ``register_variant(MethodConfig, name)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc

__all__ = ["MethodConfig"]


@dataclass
class MethodConfig:
    """Variant base: recipes say ``method: {name: <registered name>, ...}``."""

    name: str = doc("supervised", "training method (registered name, see dist_ssl.methods)")


register_section("method", MethodConfig)
