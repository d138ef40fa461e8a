"""The one registry of MoE family specs, looked up by `config.model_type`."""

from __future__ import annotations

from .builtin import BUILTIN_FAMILIES
from .spec import FamilySpec

_FAMILIES: dict[str, FamilySpec] = {}
_BY_MODEL_TYPE: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Make `spec` available to every method. Raises if a name or model type is taken, unless `replace`."""
    if not replace:
        if spec.name in _FAMILIES:
            raise ValueError(f"A family named {spec.name!r} is already registered.")
        taken = [t for t in spec.model_types if t in _BY_MODEL_TYPE]
        if taken:
            raise ValueError(f"Model types {taken} already belong to another family spec.")
    _FAMILIES[spec.name] = spec
    for model_type in spec.model_types:
        _BY_MODEL_TYPE[model_type] = spec
    return spec


def registered_families() -> dict[str, FamilySpec]:
    return dict(_FAMILIES)


def registered_families_by_type() -> dict[str, FamilySpec]:
    return dict(_BY_MODEL_TYPE)


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for_model(model) -> FamilySpec:
    """The registered spec for `model.config.model_type`, else one inferred from the common pattern."""
    from .generic import infer_family

    model_type = model.config.model_type
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    inferred = infer_family(model)
    return inferred if inferred is not None else family_for_model_type(model_type)


def family_for_model_type(model_type: str) -> FamilySpec:
    """The spec serving `model_type`; a ValueError listing supported families when there is none."""
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise ValueError(
            f"Unknown MoE architecture {model_type!r}. Supported model types: {', '.join(supported_model_types())}. "
            "To add one, describe where its router and experts live in a `hf_moeprune.families.FamilySpec` and "
            "call `hf_moeprune.register_family(spec)` (built-in specs live in hf_moeprune/families/builtin.py)."
        )
    return spec


for _spec in BUILTIN_FAMILIES:
    register_family(_spec)
