"""The one exception every config problem raises: it names the dotted key at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; `key` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with `prefix` put in front of the key (a section reports upwards)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.detail)
