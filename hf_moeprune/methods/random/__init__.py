"""Random expert pruning: the floor any informed method must beat. Data-free, seeded by the config."""

from __future__ import annotations

import torch

from ...surgery import LayerPlan, ReductionPlan
from ..base import ExpertMethod, MethodContext, MethodResult
from ..registry import register_method
from ..targets import uniform_counts


@register_method
class RandomPruning(ExpertMethod):
    name = "random"
    pretty_name = "Random expert pruning"
    kind = "prune"
    needs_calibration = False

    def validate(self, layers) -> None:
        super().validate(layers)
        uniform_counts(layers, self.config)

    def run(self, context: MethodContext) -> MethodResult:
        counts = uniform_counts(context.layers, self.config)
        generator = torch.Generator().manual_seed(self.config.seed)
        plan = ReductionPlan(top_k=self.config.top_k)
        for layer in context.layers:
            keep = torch.randperm(layer.num_experts, generator=generator)[: counts[layer.path]]
            plan.layers[layer.path] = LayerPlan.keep(keep.tolist())
        return MethodResult(plan=plan)
