"""Frequency pruning: keep the experts that route the most calibration tokens.

The naive baseline that UNCURL, MC-SMoE and STUN compare against. Per layer, experts are ranked by their
share of the layer's routed assignments (ties broken by router-probability mass) and the top `n` kept. With
`MoEPruneConfig(adaptive=True)` one global ranking of those shares picks the experts under the total budget,
every layer keeping at least its top-k, which gives non-uniform per-layer counts.
"""

from __future__ import annotations

import torch

from ...surgery import LayerPlan, ReductionPlan
from ..base import ExpertMethod, MethodContext, MethodResult
from ..registry import register_method
from ..targets import effective_top_k, total_budget, uniform_counts


@register_method
class FrequencyPruning(ExpertMethod):
    name = "frequency"
    pretty_name = "Activation-frequency expert pruning"
    kind = "prune"

    def validate(self, layers) -> None:
        super().validate(layers)
        if self.config.adaptive:
            total_budget(layers, self.config)
        else:
            uniform_counts(layers, self.config)

    def run(self, context: MethodContext) -> MethodResult:
        statistics = context.statistics()
        scores = {
            layer.path: statistics[layer.path].frequency
            + statistics[layer.path].prob_mass / max(statistics[layer.path].tokens, 1) * 1e-6
            for layer in context.layers
        }
        if self.config.adaptive:
            counts = self._global_counts(context, scores)
        else:
            counts = uniform_counts(context.layers, self.config)
        plan = ReductionPlan(top_k=self.config.top_k)
        for layer in context.layers:
            keep = torch.argsort(scores[layer.path], descending=True, stable=True)[: counts[layer.path]]
            plan.layers[layer.path] = LayerPlan.keep(keep.tolist())
        return MethodResult(plan=plan, details={"experts_per_layer": counts})

    def _global_counts(self, context: MethodContext, scores: dict[str, torch.Tensor]) -> dict[str, int]:
        """Each layer keeps its top-k, then the remaining budget goes to the highest shares model-wide."""
        budget = total_budget(context.layers, self.config)
        counts = {layer.path: effective_top_k(layer, self.config) for layer in context.layers}
        candidates = []
        for layer in context.layers:
            ranked = torch.sort(scores[layer.path], descending=True, stable=True).values.tolist()
            candidates += [(share, layer.path) for share in ranked[counts[layer.path] :]]
        candidates.sort(key=lambda item: -item[0])
        for _, path in candidates[: budget - sum(counts.values())]:
            counts[path] += 1
        return counts
