"""Random expert pruning: the floor any informed method must beat. Data-free, seeded by the config.
Under group-limited routing each group keeps the same number of its own experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import keep_per_group, uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Unit


@register_method
class RandomPruning(ExpertMethod):
    name = "random"
    pretty_name = "Random expert pruning"
    kind = "prune"
    group_aware = True

    @property
    def needs(self) -> Needs:
        return Needs()

    def validate(self, layers) -> None:
        super().validate(layers)
        uniform_counts(layers, self.config)

    def decide(self, summaries: None, layers: list[MoELayer]) -> tuple[dict[str, int], torch.Generator]:
        return uniform_counts(layers, self.config), torch.Generator().manual_seed(self.config.seed)

    def reduce(self, unit: Unit, observation: None, decision: tuple[dict[str, int], torch.Generator]) -> UnitResult:
        counts, generator = decision  # one generator drawn in layer order: the same seed keeps the same experts
        result = UnitResult()
        for layer in unit.moe_layers:
            order = torch.randperm(layer.num_experts, generator=generator).tolist()
            result.plans[layer.path] = LayerPlan.keep(keep_per_group(layer, order, counts[layer.path]))
        return result
