"""hf_moeprune: prune and merge the experts of Hugging Face Mixture-of-Experts models.

    >>> from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
    >>> model = AutoMoEPruneModelForCausalLM.from_pretrained("path/to/mixtral-like")
    >>> model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=4), calibration=texts)
    >>> model.save_pretrained("out/")
"""

__version__ = "0.1.0"

from .config import MoEPruneConfig  # noqa: E402
from .families import ExpertTensor, FamilySpec, register_family  # noqa: E402
from .methods import ExpertMethod, register_method, registered_methods  # noqa: E402
from .modeling import (  # noqa: E402
    AutoMoEPruneModelForCausalLM,
    AutoMoEPruneModelForSeq2SeqLM,
    MoEPruneModel,
)
from .models import register_models  # noqa: E402
from .surgery import LayerPlan, ReductionPlan  # noqa: E402

register_models()

__all__ = [
    "AutoMoEPruneModelForCausalLM",
    "AutoMoEPruneModelForSeq2SeqLM",
    "ExpertMethod",
    "ExpertTensor",
    "FamilySpec",
    "LayerPlan",
    "MoEPruneConfig",
    "MoEPruneModel",
    "ReductionPlan",
    "register_family",
    "register_method",
    "registered_methods",
]
