"""The one registry of expert methods, keyed by `MoEPruneConfig.method`."""

from __future__ import annotations

from .base import ExpertMethod

_METHODS: dict[str, type[ExpertMethod]] = {}


def register_method(cls: type[ExpertMethod]) -> type[ExpertMethod]:
    """Class decorator adding a method under `cls.name`; a name can be registered once."""
    name = cls.name.lower()
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"A method named {name!r} is already registered ({_METHODS[name].__qualname__}).")
    _METHODS[name] = cls
    return cls


def get_method(name: str) -> type[ExpertMethod]:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}. Registered methods: {', '.join(sorted(_METHODS))}.") from None


def registered_methods() -> dict[str, type[ExpertMethod]]:
    return dict(_METHODS)
