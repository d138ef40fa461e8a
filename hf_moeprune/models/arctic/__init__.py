"""Snowflake Arctic as a native transformers model (`model_type: "arctic"`).

Call [`register_arctic`] (hf_moeprune does on import) and an Arctic checkpoint loads with
`AutoModelForCausalLM.from_pretrained(path)` without `trust_remote_code`: the per-expert
`block_sparse_moe.experts.{j}.w1/w3/w2` keys are fused into `gate_up_proj` / `down_proj` on load and
`save_pretrained` writes them back under their original names.
"""

from __future__ import annotations

from .configuration_arctic import ArcticConfig
from .modeling_arctic import (
    ArcticDecoderLayer,
    ArcticDenseBlock,
    ArcticExperts,
    ArcticForCausalLM,
    ArcticMLP,
    ArcticModel,
    ArcticPreTrainedModel,
    ArcticSparseMoeBlock,
    ArcticTopKRouter,
)

_REGISTERED = False


def arctic_weight_conversions() -> list:
    """The checkpoint <-> model key conversions of Arctic (the Mixtral ones, without the rename of
    `block_sparse_moe`, which Arctic keeps). Applied forward on load and reversed on save."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    return [
        WeightConverter(
            source_patterns=["block_sparse_moe.experts.*.w1.weight", "block_sparse_moe.experts.*.w3.weight"],
            target_patterns="block_sparse_moe.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="block_sparse_moe.experts.*.w2.weight",
            target_patterns="block_sparse_moe.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def register_arctic() -> None:
    """Register Arctic with transformers' Auto classes and weight-conversion table. Idempotent.

    After this, `AutoConfig` maps `model_type: "arctic"` to [`ArcticConfig`], `AutoModel` /
    `AutoModelForCausalLM` map it to [`ArcticModel`] / [`ArcticForCausalLM`], and loading or saving an
    Arctic model converts between per-expert checkpoint keys and fused expert tensors.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    AutoConfig.register(ArcticConfig.model_type, ArcticConfig, exist_ok=True)
    AutoModel.register(ArcticConfig, ArcticModel, exist_ok=True)
    AutoModelForCausalLM.register(ArcticConfig, ArcticForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(
        ArcticConfig.model_type, arctic_weight_conversions(), overwrite=True
    )
    _REGISTERED = True


__all__ = [
    "ArcticConfig",
    "ArcticDecoderLayer",
    "ArcticDenseBlock",
    "ArcticExperts",
    "ArcticForCausalLM",
    "ArcticMLP",
    "ArcticModel",
    "ArcticPreTrainedModel",
    "ArcticSparseMoeBlock",
    "ArcticTopKRouter",
    "arctic_weight_conversions",
    "register_arctic",
]
