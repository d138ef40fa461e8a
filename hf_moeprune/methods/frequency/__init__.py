"""Frequency pruning: keep the experts that route the most calibration tokens in each layer.

The naive baseline that UNCURL, MC-SMoE and STUN compare against. Per layer, experts are ranked by their
routed-token count (ties broken by router-probability mass) and the top `n` kept.
"""

from __future__ import annotations

import torch

from ...surgery import LayerPlan, ReductionPlan
from ..base import ExpertMethod, MethodContext, MethodResult
from ..registry import register_method
from ..targets import uniform_counts


@register_method
class FrequencyPruning(ExpertMethod):
    name = "frequency"
    pretty_name = "Activation-frequency expert pruning"
    kind = "prune"

    def validate(self, layers) -> None:
        super().validate(layers)
        uniform_counts(layers, self.config)

    def run(self, context: MethodContext) -> MethodResult:
        counts = uniform_counts(context.layers, self.config)
        statistics = context.statistics()
        plan = ReductionPlan(top_k=self.config.top_k)
        for layer in context.layers:
            stats = statistics[layer.path]
            score = stats.counts + stats.prob_mass / max(stats.tokens, 1) * 1e-3
            keep = torch.argsort(score, descending=True, stable=True)[: counts[layer.path]]
            plan.layers[layer.path] = LayerPlan.keep(keep.tolist())
        return MethodResult(plan=plan)
