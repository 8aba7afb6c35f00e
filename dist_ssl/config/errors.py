"""The one error type of the config system: it always names the full key path."""

from dist_ssl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem; `str()` is one line: '<key.path>: <what is wrong>'."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)
