"""MoE family specs: where each architecture keeps routers and experts."""

from .registry import (
    family_for_model,
    family_for_model_type,
    register_family,
    registered_families,
    supported_model_types,
)
from .spec import FUSED_SWIGLU, ExpertTensor, FamilySpec

__all__ = [
    "FUSED_SWIGLU",
    "ExpertTensor",
    "FamilySpec",
    "family_for_model",
    "family_for_model_type",
    "register_family",
    "registered_families",
    "supported_model_types",
]
