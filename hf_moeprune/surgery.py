"""Expert surgery written once: apply a per-layer keep / merge plan to any family.

Scoring (which needs data) is kept apart from surgery (which needs none): a method produces a
`ReductionPlan`, and `apply_plan` rewrites expert weights, router rows and biases and the count attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .moe_layers import MoELayer
from .nonuniform import tie_router


@dataclass
class LayerPlan:
    """What one MoE layer becomes.

    Args:
        groups: For each new expert, the indices of the current experts it is built from. A group of one
            keeps that expert untouched; a larger group is merged.
        weights: Merge weights per group (normalised to sum to 1 when applied). None means equal weights.
        router_rows: How a merged expert's router row (and router biases) are formed: `"weighted"` (the
            merge-weighted average of the members' rows) or `"anchor"` (the first member's row).
        tied_router: Keep all E router rows instead (routing unchanged) and send each row's tokens to the
            merged expert of its group; the groups must then cover every expert. The result is no longer the
            family's native architecture: it loads through the record's expert map (`nonuniform.tie_router`).
    """

    groups: list[list[int]]
    weights: list[list[float]] | None = None
    router_rows: Literal["weighted", "anchor"] = "weighted"
    tied_router: bool = False

    @classmethod
    def keep(cls, indices: Sequence[int]) -> LayerPlan:
        """Keep the experts at `indices` (in ascending order, so kept experts stay in their original order)."""
        return cls(groups=[[int(i)] for i in sorted(indices)])

    @property
    def num_experts(self) -> int:
        return len(self.groups)

    def normalised_weights(self) -> list[list[float]]:
        if self.weights is None:
            return [[1.0 / len(g)] * len(g) for g in self.groups]
        if len(self.weights) != len(self.groups):
            raise ValueError(f"the plan has {len(self.weights)} lists of merge weights for {len(self.groups)} groups.")
        result = []
        for group, weights in zip(self.groups, self.weights, strict=True):
            total = float(sum(weights))
            if len(weights) != len(group) or total <= 0:
                raise ValueError(f"merge weights {weights} do not fit group {group}.")
            result.append([float(w) / total for w in weights])
        return result


@dataclass
class ReductionPlan:
    """A `LayerPlan` per MoE layer path; layers left out are not changed."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    top_k: int | None = None


def validate_layer_plan(layer: MoELayer, plan: LayerPlan, top_k: int | None = None) -> None:
    """Raise a ValueError naming the layer when the plan cannot be applied."""
    if not plan.groups:
        raise ValueError(f"{layer.path}: the plan keeps no expert.")
    seen: set[int] = set()
    for group in plan.groups:
        if not group:
            raise ValueError(f"{layer.path}: the plan has an empty group.")
        for index in group:
            if not 0 <= index < layer.num_experts:
                raise ValueError(f"{layer.path}: expert index {index} out of range (layer has {layer.num_experts}).")
            if index in seen:
                raise ValueError(f"{layer.path}: expert {index} appears in more than one group.")
            seen.add(index)
    try:  # weights that do not fit the groups are refused here, before any layer is rewritten
        plan.normalised_weights()
    except ValueError as error:
        raise ValueError(f"{layer.path}: {error}") from None
    if layer.expert_map is not None:
        raise ValueError(
            f"{layer.path} was merged with a tied router; reduce it again from a merge with "
            "router='folded' (the family's native architecture)."
        )
    if plan.tied_router:
        if len(seen) != layer.num_experts:
            missing = sorted(set(range(layer.num_experts)) - seen)
            raise ValueError(f"{layer.path}: a tied router maps every expert, but the plan leaves out {missing}.")
        if layer.spec.routing_format != "topk_index":
            raise ValueError(
                f"{layer.path}: family {layer.spec.name!r} does not pass top-k indices to its experts, so a tied "
                "router cannot be mapped; use router='folded'."
            )
    effective_top_k = top_k if top_k is not None else layer.top_k
    if plan.num_experts < effective_top_k:
        raise ValueError(
            f"{layer.path}: {plan.num_experts} experts is below the router's top-k of {effective_top_k}; "
            "set MoEPruneConfig(top_k=...) to lower top-k as well."
        )
    if not plan.tied_router:  # a tied router keeps its rows, so the groups it routes through stay as they are
        validate_group_limited_plan(layer, plan, layer.num_expert_groups)


def validate_group_limited_plan(layer: MoELayer, plan: LayerPlan, num_groups: int) -> None:
    """Group-limited routing reads expert j of E' as a member of group `j // (E'/G)`: the plan must keep equal
    counts per group, every merged expert inside one group and the new experts in group order, or tokens
    would be routed through groups whose members moved."""
    if num_groups <= 1:
        return
    group_size = layer.num_experts // num_groups
    key = layer.spec.expert_groups_key
    groups_of = [sorted({index // group_size for index in group}) for group in plan.groups]
    crossing = [group for group, owners in zip(plan.groups, groups_of, strict=True) if len(owners) > 1]
    if crossing:
        raise ValueError(
            f"{layer.path}: merged experts {crossing} span several expert groups ({key}={num_groups}, "
            f"{group_size} experts each); merge only within a group."
        )
    owners = [owner[0] for owner in groups_of]
    if owners != sorted(owners):
        raise ValueError(f"{layer.path}: the plan reorders experts across groups ({key}={num_groups}); "
                         "list new experts in group order.")
    counts = [owners.count(g) for g in range(num_groups)]
    if len(set(counts)) > 1:
        listed = ", ".join(f"group {g}: {c}" for g, c in enumerate(counts))
        raise ValueError(
            f"{layer.path}: group-limited routing ({key}={num_groups}) needs the same number of experts in every "
            f"group, the plan keeps {listed}; keep a multiple of {num_groups} experts spread evenly over the groups."
        )
    if counts[0] < 2:
        raise ValueError(
            f"{layer.path}: group-limited routing scores each group by its top-2 experts; keep at least 2 "
            f"experts per group ({2 * num_groups} in this layer)."
        )


def _combine(tensor: torch.Tensor, groups: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
    """New `[E', ...]` tensor whose row j is the weighted sum of `tensor`'s rows in group j (in float32).

    Written into one preallocated tensor (kept experts by one `index_select`), so a layer's experts are
    never held twice over while it is rewritten.
    """
    if all(len(group) == 1 for group in groups):
        return tensor.detach().index_select(0, torch.tensor([g[0] for g in groups], device=tensor.device))
    out = tensor.new_empty((len(groups), *tensor.shape[1:]))
    for row, (group, group_weights) in enumerate(zip(groups, weights, strict=True)):
        if len(group) == 1:
            out[row] = tensor[group[0]].detach()
            continue
        stacked = tensor[group].detach().float()
        w = torch.tensor(group_weights, dtype=torch.float32, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
        out[row] = (stacked * w).sum(0).to(tensor.dtype)
    return out


@torch.no_grad()
def apply_layer_plan(layer: MoELayer, plan: LayerPlan, top_k: int | None = None) -> None:
    """Rewrite one layer in place: expert weights, router rows and biases, count and top-k attributes."""
    validate_layer_plan(layer, plan, top_k)
    old_count = layer.num_experts
    weights = plan.normalised_weights()
    new_experts = {name: _combine(t, plan.groups, weights) for name, t in layer.expert_tensors().items()}
    layer.set_expert_tensors(new_experts)
    if plan.tied_router:
        layer.set_counts(old_count, plan.num_experts, top_k, router=False)
        tie_router(layer.experts, [owner for _, owner in sorted((e, j) for j, g in enumerate(plan.groups) for e in g)])
        return
    router_weights = weights if plan.router_rows == "weighted" else [[1.0] + [0.0] * (len(g) - 1) for g in plan.groups]
    new_router = {name: _combine(t, plan.groups, router_weights) for name, t in layer.router_tensors().items()}
    layer.set_router_tensors(new_router)
    layer.set_counts(old_count, plan.num_experts, top_k)


def apply_plan(layers: Sequence[MoELayer], plan: ReductionPlan) -> None:
    """Validate every layer's plan first, then apply them: a bad plan changes nothing."""
    by_path = {layer.path: layer for layer in layers}
    unknown = sorted(set(plan.layers) - set(by_path))
    if unknown:
        raise ValueError(f"The plan names layers the model does not have: {unknown}.")
    for path, layer_plan in plan.layers.items():
        validate_layer_plan(by_path[path], layer_plan, plan.top_k)
    for path, layer_plan in plan.layers.items():
        apply_layer_plan(by_path[path], layer_plan, plan.top_k)
