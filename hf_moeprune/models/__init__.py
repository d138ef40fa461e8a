"""Native transformers implementations of MoE families that transformers does not ship."""

from .arctic import ArcticConfig, ArcticForCausalLM, ArcticModel, register_arctic


def register_models() -> None:
    """Register every model of this package with transformers' Auto classes. Idempotent."""
    register_arctic()


__all__ = ["ArcticConfig", "ArcticForCausalLM", "ArcticModel", "register_arctic", "register_models"]
