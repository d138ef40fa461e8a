"""hf_moeprune: prune and merge the experts of Hugging Face Mixture-of-Experts models.

    >>> from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
    >>> model = AutoMoEPruneModelForCausalLM.from_pretrained("path/to/mixtral-like")
    >>> model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=4), calibration=texts)
    >>> model.save_pretrained("out/")

The public names load lazily (PEP 562) so `hf-moeprune --help` does not import torch or transformers.
The Arctic model is registered with transformers' Auto classes on first use of any public name, when
`hf_moeprune.modeling` is imported, and at once if transformers is already loaded when this package is.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "MoEPruneConfig": "config",
    "ExpertTensor": "families",
    "FamilySpec": "families",
    "register_family": "families",
    "ExpertMethod": "methods",
    "Needs": "methods",
    "register_method": "methods",
    "registered_methods": "methods",
    "AutoMoEPruneModelForCausalLM": "modeling",
    "AutoMoEPruneModelForSeq2SeqLM": "modeling",
    "MoEPruneModel": "modeling",
    "FinetuneArgs": "finetuning.args",
    "finetune": "finetuning",
    "register_models": "models",
    "reduce_checkpoint": "pipeline.streaming",
    "LayerPlan": "surgery",
    "ReductionPlan": "surgery",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the submodule behind a public name on first access (and register Arctic with transformers)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    _register_models()
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_models() -> None:
    """Register Arctic with the Auto classes (idempotent): anyone using the model-facing API gets it loaded."""
    from .models import register_models

    register_models()


# A user who already imported transformers expects `import hf_moeprune` to make Arctic loadable right away.
if "transformers" in sys.modules:
    _register_models()
