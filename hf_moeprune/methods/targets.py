"""Turning a recipe's expert target into per-layer counts, with the checks that must fail early."""

from __future__ import annotations

from ..config import MoEPruneConfig
from ..moe_layers import MoELayer


def effective_top_k(layer: MoELayer, config: MoEPruneConfig) -> int:
    return config.top_k if config.top_k is not None else layer.top_k


def check_layer_count(layer: MoELayer, count: int, config: MoEPruneConfig) -> None:
    """A ValueError naming the layer when `count` experts cannot serve it."""
    if count >= layer.num_experts:
        raise ValueError(
            f"Target of {count} experts is not below the {layer.num_experts} experts of {layer.path}; "
            "nothing would be removed."
        )
    top_k = effective_top_k(layer, config)
    if count < top_k:
        raise ValueError(
            f"Target of {count} experts is below the router's top-k of {top_k} in {layer.path}; "
            "pass MoEPruneConfig(top_k=...) to lower top-k as well."
        )
    if config.top_k is not None and config.top_k > layer.top_k:
        raise ValueError(f"top_k={config.top_k} is above the model's top-k of {layer.top_k}; it can only be lowered.")


def uniform_counts(layers: list[MoELayer], config: MoEPruneConfig) -> dict[str, int]:
    """Per-layer counts when every layer keeps the same share: `experts_per_layer`, or `expert_sparsity`
    applied to each layer, or `num_experts_total` split evenly."""
    counts = {}
    total_experts = sum(layer.num_experts for layer in layers)
    for layer in layers:
        if config.experts_per_layer is not None:
            count = config.experts_per_layer
        elif config.expert_sparsity is not None:
            count = layer.num_experts - round(layer.num_experts * config.expert_sparsity)
        else:
            count = round(config.num_experts_total * layer.num_experts / total_experts)
        check_layer_count(layer, count, config)
        counts[layer.path] = count
    return counts


def total_budget(layers: list[MoELayer], config: MoEPruneConfig) -> int:
    """Experts kept over all layers, for methods that spread the budget unevenly."""
    total = sum(layer.num_experts for layer in layers)
    if config.num_experts_total is not None:
        kept = config.num_experts_total
    elif config.expert_sparsity is not None:
        kept = total - round(total * config.expert_sparsity)
    else:
        kept = config.experts_per_layer * len(layers)
    floor = sum(effective_top_k(layer, config) for layer in layers)
    if kept >= total:
        raise ValueError(f"Target of {kept} experts in total is not below the model's {total} experts.")
    if kept < floor:
        raise ValueError(
            f"Target of {kept} experts in total cannot give every layer its top-k ({floor} needed); "
            "lower top-k with MoEPruneConfig(top_k=...) or keep more experts."
        )
    return kept
