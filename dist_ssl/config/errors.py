"""The one error type of the config system: it always names the full key path, and for a
likely typo the nearest valid key (``nearest_key``)."""
from __future__ import annotations

import difflib
from typing import Iterable

from dist_ssl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem; `str()` is one line: '<key.path>: <what is wrong>'."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def nearest_key(key: str, valid: Iterable[str]) -> str:
    """' (did you mean "x"?)' for a likely typo, else ''."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""
