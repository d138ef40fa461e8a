"""Typed method options: `MoEPruneConfig.method_options` (a plain dict) checked against a method's dataclass.

Every method declares `Options`, a dataclass whose fields are its options with their defaults. `parse_options`
refuses unknown keys (listing the valid ones) and converts each value to its field's type, naming the option
when it cannot, so a typo or a wrong type fails before any calibration instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


@dataclasses.dataclass
class NoOptions:
    """For methods that take no options."""


def parse_options(cls: type[T], values: Mapping[str, Any], method: str) -> T:
    """`cls(**values)` with unknown keys refused and every value converted to its field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) if fields else "none (this method takes no options)"
        raise ValueError(f"Unknown option(s) {', '.join(unknown)} for method {method!r}; valid options: {valid}.")
    hints = typing.get_type_hints(cls)
    converted = {key: convert(value, hints[key], f"option {key!r} of method {method!r}") for key, value in values.items()}
    return cls(**converted)


def convert(value: Any, kind: Any, what: str) -> Any:
    """`value` as type `kind` (bool, int, float, str, Literal, Optional/Union, tuple[str, ...]) or a ValueError."""
    origin, params = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in params:
            raise ValueError(f"{what} must be one of {', '.join(map(repr, params))}, got {value!r}.")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in params:
            return None
        errors = []
        for option in params:
            if option is type(None):
                continue
            try:
                return convert(value, option, what)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{what}: {value!r} fits none of its types.")
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{what} must be a list, got {value!r}.")
        return tuple(convert(item, params[0], what) for item in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{what} must be true or false, got {value!r}.")
    if kind is int:
        if isinstance(value, str):
            value = _number(value, what)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be a whole number, got {value!r}.")
        return value
    if kind is float:
        if isinstance(value, str):
            value = _number(value, what)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} must be a number, got {value!r}.")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string, got {value!r}.")
        return value
    return value


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}.") from None


def normalised(options: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """The converted values of the keys the user gave, for the recorded recipe."""
    return {key: getattr(options, key) for key in given}
