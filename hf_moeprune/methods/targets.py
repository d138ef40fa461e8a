"""Turning a recipe's expert target into per-layer counts, with the checks that must fail early.

Group-limited routing (DeepSeek-V2/V3, GLM-4.5-MoE: the family spec's `expert_groups_key`) reads expert j
of E as a member of group `j // (E / G)`, so a layer's budget is split per group: every group keeps
`count / G` of its own experts (`keep_per_group`, `expert_groups`), or the target is refused here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from ..config import MoEPruneConfig
from ..moe_layers import MoELayer
from ..surgery import LayerPlan

logger = logging.getLogger(__name__)


def effective_top_k(layer: MoELayer, config: MoEPruneConfig) -> int:
    return config.top_k if config.top_k is not None else layer.top_k


def fewest_experts(layer: MoELayer, config: MoEPruneConfig) -> int:
    """The fewest experts `layer` can keep: its router's top-k, and under group-limited routing a multiple of
    the G groups with at least 2 per group (the router scores each group by its top-2)."""
    top_k = effective_top_k(layer, config)
    groups = layer.num_expert_groups
    return top_k if groups == 1 else groups * max(2, -(-top_k // groups))


def expert_groups(layer: MoELayer) -> list[list[int]]:
    """The experts of each routing group in group order (one group of every expert without group routing)."""
    size = layer.num_experts // layer.num_expert_groups
    return [list(range(start, start + size)) for start in range(0, layer.num_experts, size)]


def describe_groups(layer: MoELayer) -> str:
    """E.g. `n_group=2: experts 0-3, 4-7`, for error messages."""
    spans = ", ".join(f"{members[0]}-{members[-1]}" for members in expert_groups(layer))
    return f"{layer.spec.expert_groups_key}={layer.num_expert_groups}: experts {spans}"


def keep_per_group(layer: MoELayer, ranked: Sequence[int], count: int) -> list[int]:
    """The best `count` experts of `ranked` (best first) under group-limited routing: the best `count / G`
    of each group, so every group keeps the same number of its own experts. Without groups: `ranked[:count]`."""
    groups = expert_groups(layer)
    share = count // len(groups)
    keep: list[int] = []
    for members in groups:
        inside = set(members)
        keep += [int(e) for e in ranked if e in inside][:share]
    return sorted(keep)


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
    groups = layer.num_expert_groups
    if groups > 1 and (count % groups or count // groups < 2):
        # each group is scored by its top-2 experts, so a group needs two of them
        raise ValueError(
            f"Target of {count} experts in {layer.path} cannot keep its expert groups equal "
            f"({describe_groups(layer)}); keep a multiple of {groups} experts, at least {2 * groups}."
        )


def uniform_counts(layers: list[MoELayer], config: MoEPruneConfig) -> dict[str, int]:
    """Per-layer counts when every layer keeps the same share: `experts_per_layer`, or `expert_sparsity`
    applied to each layer, or `num_experts_total` split evenly (refused when it does not split exactly, rather
    than keeping another total than the one asked)."""
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
    kept = sum(counts.values())
    if config.num_experts_total is not None and kept != config.num_experts_total:
        raise ValueError(
            f"num_experts_total={config.num_experts_total} does not split into one count per layer over "
            f"{len(layers)} MoE layers (the nearest split keeps {kept}); ask for {kept}, or use experts_per_layer."
        )
    return counts


def total_budget(layers: list[MoELayer], config: MoEPruneConfig, per_group: bool = False) -> int:
    """Experts kept over all layers, for methods that spread the budget unevenly.

    Args:
        per_group: The method keeps the routing groups of every layer equal (STUN clusters each group on its
            own), so group-limited routing is accepted when the total splits into equal groups.
    """
    grouped = [layer for layer in layers if layer.num_expert_groups > 1]
    if grouped and not per_group:
        raise ValueError(
            f"Non-uniform per-layer counts would not keep the expert groups of group-limited routing equal "
            f"({grouped[0].path}, {describe_groups(grouped[0])}); use uniform counts (adaptive=False, uniform=True)."
        )
    total = sum(layer.num_experts for layer in layers)
    if config.num_experts_total is not None:
        kept = config.num_experts_total
    elif config.expert_sparsity is not None:
        kept = total - round(total * config.expert_sparsity)
    else:
        kept = config.experts_per_layer * len(layers)
    floor = sum(fewest_experts(layer, config) for layer in layers)
    if kept >= total:
        raise ValueError(f"Target of {kept} experts in total is not below the model's {total} experts.")
    if kept < floor:
        raise ValueError(
            f"Target of {kept} experts in total cannot give every layer its top-k"
            f"{' and 2 experts per routing group' if grouped else ''} ({floor} needed); "
            "lower top-k with MoEPruneConfig(top_k=...) or keep more experts."
        )
    step = math.gcd(*(layer.num_expert_groups for layer in layers))
    if grouped and kept % step:
        raise ValueError(
            f"Target of {kept} experts in total cannot keep the expert groups of group-limited routing equal "
            f"({describe_groups(grouped[0])} in every layer); choose a multiple of {step}."
        )
    return kept


def warn_routers_without_choice(layers: Sequence[MoELayer], plans: Mapping[str, LayerPlan]) -> list[str]:
    """Log one warning naming the reduced layers left with exactly their top-k experts: every token then
    runs all of them, so the router no longer chooses (it only weighs them). Returns those layers' paths.
    Tied routers are left out: their E rows still choose, and may send a token's picks to one expert."""
    paths = [
        layer.path for layer in layers
        if layer.path in plans and not plans[layer.path].tied_router and layer.num_experts == layer.top_k
    ]
    if paths:
        logger.warning(
            "%d layer(s) keep exactly their top-k experts, so their router no longer chooses which experts run "
            "(every token uses all of them): %s. Keep more experts, or lower top-k with MoEPruneConfig(top_k=...), "
            "if the router should still choose.", len(paths), ", ".join(paths),
        )
    return paths
