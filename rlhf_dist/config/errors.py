"""The error every config check raises, and the small checks the groups share."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad or inconsistent configuration value; the message names the dotted key."""


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{key}={value!r}: {fix}")


def _check_positive(group: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            _fail(f"{group}.{name}", value, "must be > 0")


def _check_fraction(group: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            _fail(f"{group}.{name}", value, "must be in [0, 1]")

