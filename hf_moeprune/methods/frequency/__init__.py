"""Frequency pruning: keep the experts that route the most calibration tokens.

The naive baseline that UNCURL, MC-SMoE and STUN compare against. Per layer, experts are ranked by their
share of the layer's routed assignments (ties broken by router-probability mass) and the top `n` kept: MC-SMoE's
usage count (UNITES-Lab/MC-SMoE `mcsmoe/merging/grouping_mixtral.py` `compute_all_usages`, l.193-219, with the
model's own top-k where the reference hard-codes 2) and its per-layer "prune non-core experts" rule. With
`MoEPruneConfig(adaptive=True)` one global ranking of those shares picks the experts under the total budget,
every layer keeping at least its top-k, which gives non-uniform per-layer counts; the budget is met exactly
(MC-SMoE's global threshold, which can fall short on ties, is `mc-smoe`'s count rule). Option `uniform=True`
(one count per layer, what serving engines load) is the per-layer ranking, so it refuses `adaptive=True`. Under
group-limited routing each group keeps its own most-routed experts, `n / G` of them (`targets.keep_per_group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...calibration.statistics import LayerStatistics
from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import effective_top_k, keep_per_group, total_budget, uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


@dataclass
class FrequencyOptions:
    uniform: bool = False


@register_method
class FrequencyPruning(ExpertMethod):
    name = "frequency"
    pretty_name = "Activation-frequency expert pruning"
    kind = "prune"
    group_aware = True
    Options = FrequencyOptions

    def validate(self, layers) -> None:
        super().validate(layers)
        if self.opts.uniform and self.config.adaptive:
            raise ValueError(
                "frequency: uniform=True asks for one count per layer but adaptive=True gives each layer its own; "
                "drop adaptive=True (the per-layer ranking is the uniform result)."
            )
        if self.config.adaptive:
            total_budget(layers, self.config)
        else:
            uniform_counts(layers, self.config)

    @property
    def needs(self) -> Needs:
        return Needs(statistics=True, global_decision=bool(self.config.adaptive))

    def summarize(self, unit: Unit, observation: Observation) -> dict[str, torch.Tensor]:
        return {layer.path: _shares(observation.statistics[layer.path]) for layer in unit.moe_layers}

    def decide(self, summaries: dict[str, dict[str, torch.Tensor]] | None, layers: list[MoELayer]) -> dict[str, int]:
        if not self.config.adaptive:
            counts = uniform_counts(layers, self.config)
        else:
            scores = {path: score for unit in summaries.values() for path, score in unit.items()}
            counts = self._global_counts(layers, scores)
        self.details = {"experts_per_layer": counts}
        return counts

    def reduce(self, unit: Unit, observation: Observation | dict, counts: dict[str, int]) -> UnitResult:
        scores = observation if self.config.adaptive else self.summarize(unit, observation)
        result = UnitResult()
        for layer in unit.moe_layers:
            ranked = torch.argsort(scores[layer.path], descending=True, stable=True).tolist()
            result.plans[layer.path] = LayerPlan.keep(keep_per_group(layer, ranked, counts[layer.path]))
        return result

    def _global_counts(self, layers: list[MoELayer], scores: dict[str, torch.Tensor]) -> dict[str, int]:
        """Each layer keeps its top-k, then the remaining budget goes to the highest shares model-wide."""
        budget = total_budget(layers, self.config)
        counts = {layer.path: effective_top_k(layer, self.config) for layer in layers}
        candidates = []
        for layer in layers:
            ranked = torch.sort(scores[layer.path], descending=True, stable=True).values.tolist()
            candidates += [(share, layer.path) for share in ranked[counts[layer.path] :]]
        candidates.sort(key=lambda item: -item[0])
        for _, path in candidates[: budget - sum(counts.values())]:
            counts[path] += 1
        return counts


def _shares(stats: LayerStatistics) -> torch.Tensor:
    """Routed share per expert, ties broken by router-probability mass."""
    return stats.frequency + stats.prob_mass / max(stats.tokens, 1) * 1e-6
