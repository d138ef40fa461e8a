"""REAP: router-weighted expert activation pruning, with super-expert protection.

Paper: Lasby et al., "REAP the Experts" (https://arxiv.org/abs/2510.13999), code CerebrasResearch/reap.
For each layer and expert j, over the calibration tokens routed to j:

    S_j = mean_{x routed to j} g_j(x) * ||f_j(x)||_2

with g_j(x) the routing weight the model actually applies (softmax probability, renormalised over the
top-k where the model does so) and f_j(x) the expert's output. The lowest-scoring experts of every layer
are dropped (uniform counts). "Super experts", whose largest output activation exceeds
max(99.5th percentile over all experts of all layers, global maximum / 10), are never dropped.

Options (`MoEPruneConfig.method_options`): `protect_super_experts` (default True),
`super_expert_quantile` (default 0.995), `super_expert_fraction` (default 0.1).

Example:
    >>> model.prune_experts(MoEPruneConfig(method="reap", expert_sparsity=0.5), calibration=texts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


def reap_scores(gated_output_norm_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean gated output norm over routed tokens; 0 for experts no token reached."""
    return torch.where(
        counts > 0, gated_output_norm_sum / counts.clamp(min=1), torch.zeros_like(gated_output_norm_sum)
    )


def super_experts(
    output_max: dict[str, torch.Tensor], quantile: float = 0.995, fraction: float = 0.1
) -> dict[str, list[int]]:
    """Experts whose peak |activation| exceeds max(quantile over all experts, global max * fraction)."""
    values = torch.cat([v.double().flatten() for v in output_max.values()])
    if values.numel() == 0 or float(values.max()) <= 0:
        return {path: [] for path in output_max}
    threshold = max(float(torch.quantile(values, quantile)), float(values.max()) * fraction)
    return {path: torch.nonzero(v.double() > threshold).flatten().tolist() for path, v in output_max.items()}


@dataclass
class REAPOptions:
    protect_super_experts: bool = True
    super_expert_quantile: float = 0.995
    super_expert_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("super_expert_quantile", "super_expert_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"option {name!r} of method 'reap' must be in [0, 1], got {getattr(self, name)}.")


@register_method
class REAP(ExpertMethod):
    name = "reap"
    pretty_name = "REAP (router-weighted expert activation pruning)"
    paper = "https://arxiv.org/abs/2510.13999"
    kind = "prune"
    Options = REAPOptions

    def validate(self, layers) -> None:
        super().validate(layers)
        uniform_counts(layers, self.config)

    @property
    def needs(self) -> Needs:
        # super experts are found by one quantile over every layer's peaks: a global decision
        return Needs(statistics=True, global_decision=self.opts.protect_super_experts)

    def summarize(self, unit: Unit, observation: Observation) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per MoE layer: REAP scores and the peak |output| per expert (all the decision needs)."""
        return {
            layer.path: (
                reap_scores(observation.statistics[layer.path].gated_output_norm_sum,
                            observation.statistics[layer.path].counts),
                observation.statistics[layer.path].output_max,
            )
            for layer in unit.moe_layers
        }

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> tuple[dict, dict]:
        opts = self.opts
        counts = uniform_counts(layers, self.config)
        protected: dict[str, list[int]] = {layer.path: [] for layer in layers}
        if opts.protect_super_experts:
            peaks = {path: entry[1] for unit in summaries.values() for path, entry in unit.items()}
            protected = super_experts(peaks, opts.super_expert_quantile, opts.super_expert_fraction)
        self.details = {"scores": {}, "super_experts": protected}
        return counts, protected

    def reduce(self, unit: Unit, observation: Observation | dict, decision: tuple[dict, dict]) -> UnitResult:
        counts, protected = decision
        summary = observation if self.opts.protect_super_experts else self.summarize(unit, observation)
        result = UnitResult()
        for layer in unit.moe_layers:
            score = summary[layer.path][0]
            ranked = torch.argsort(score, descending=True, stable=True).tolist()
            shielded = [e for e in ranked if e in protected[layer.path]]
            if len(shielded) > counts[layer.path]:  # more super experts than places: keep the best-scoring ones
                self.details.setdefault("super_expert_overflow", []).append(layer.path)
            keep = (shielded + [e for e in ranked if e not in shielded])[: counts[layer.path]]
            result.plans[layer.path] = LayerPlan.keep(keep)
            self.details["scores"][layer.path] = [round(float(s), 6) for s in score]
        return result
