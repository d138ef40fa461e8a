"""Fallback for families without a spec: recognise the common transformers 5 router + fused experts pattern.

A block qualifies when it has an `experts` child decorated with `use_experts_implementation` holding
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, and a `gate` or `router` child whose `weight` is
`[E, H]`. Anything else still needs a `FamilySpec`.
"""

from __future__ import annotations

import re

from torch import nn

from .spec import FamilySpec

ROUTER_NAMES = ("gate", "router")
NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k")


def infer_family(model: nn.Module) -> FamilySpec | None:
    """A spec inferred from the model's modules, or None when the pattern is not found."""
    patterns: set[str] = set()
    router_name = None
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not _is_standard_fused(experts):
            continue
        for name in ROUTER_NAMES:
            weight = getattr(getattr(module, name, None), "weight", None)
            # at least one row per expert: a tied router (a merge's router="tied") keeps all its original rows
            if weight is not None and weight.dim() == 2 and weight.shape[0] >= experts.gate_up_proj.shape[0]:
                router_name = router_name or name
                patterns.add(re.sub(r"\.\d+(?=\.|$)", ".*", path))
    config = getattr(model, "config", None)
    num_experts_key = next((k for k in NUM_EXPERTS_KEYS if isinstance(getattr(config, k, None), int)), None)
    if not patterns or router_name is None or num_experts_key is None:
        return None
    model_type = getattr(config, "model_type", "unknown")
    return FamilySpec(
        name=f"generic:{model_type}",
        model_types=(model_type,),
        moe_block_patterns=tuple(sorted(patterns)),
        router=router_name,
        experts="experts",
        num_experts_key=num_experts_key,
        top_k_key=next((k for k in TOP_K_KEYS if isinstance(getattr(config, k, None), int)), None),
    )


def _is_standard_fused(experts: object) -> bool:
    if not isinstance(experts, nn.Module) or not hasattr(experts, "has_gate"):
        return False
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or not experts.has_gate:
        return False
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (
        gate_up is not None and down is not None and gate_up.dim() == 3 and down.dim() == 3
        and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    )
