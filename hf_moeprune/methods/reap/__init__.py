"""REAP: router-weighted expert activation pruning.

Paper: Lasby et al., "REAP the Experts" (https://arxiv.org/abs/2510.13999), code CerebrasResearch/reap.
For each layer and expert j, over the calibration tokens routed to j:

    S_j = mean_{x routed to j} g_j(x) * ||f_j(x)||_2

with f_j(x) the expert's output and, as in the authors' code (`src/reap/pruning_metrics.py`
`update_pruning_state`, l.172-198), g_j(x) the softmax probability over all router logits, renormalised
over the token's top-k only when the model config sets `norm_topk_prob` (`src/reap/main.py`
`_setup_observer`, l.120-124). So on Mixtral, which renormalises in its forward but has no
`norm_topk_prob`, the authors score with the unrenormalised probability. Each layer drops its
`int(E * expert_sparsity)` lowest-scoring experts (`src/reap/prune.py` l.250-262 and l.101-103).

Super-expert protection is off by default (`--perserve_super_experts`, `src/reap/args.py` l.514-521). When on,
an expert is protected whose largest output entry (signed, the running max starts at 0:
`pruning_metrics.py` l.61-63, l.200-202) exceeds max(99.5th percentile over all experts of all layers,
global maximum / 10), looking at the first 75% of layers only (`src/reap/model_util.py`
`get_super_expert_indices`, l.240-262); protected experts score +inf, so they are kept first.

Options (`MoEPruneConfig.method_options`):
    gate: `"reference"` (default, as above) or `"applied"`: the routing weight the model really applies
        (renormalised where the model renormalises, as llm-compressor's REAP); prefer it to score experts by
        their actual contribution to the layer output, e.g. on Mixtral.
    protect_super_experts: default False.
    super_expert_layers: `"first_75_percent"` (default, the authors' `--perserve_super_experts`) or
        `"all"` (their `--perserve_outliers`, and this package's earlier default).
    super_expert_peak: `"signed"` (default, the authors') or `"abs"` (largest |f_j(x)|, the earlier default:
        also catches experts whose outliers are negative).
    super_expert_quantile (0.995), super_expert_fraction (0.1): the two thresholds.
A count from `expert_sparsity` prunes `int(E * r)` experts per layer; `experts_per_layer` is taken as given.

Example:
    >>> model.prune_experts(MoEPruneConfig(method="reap", expert_sparsity=0.5), calibration=texts)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import check_layer_count, keep_per_group, uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


def reap_scores(gated_output_norm_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean gated output norm over routed tokens; 0 for experts no token reached."""
    return torch.where(
        counts > 0, gated_output_norm_sum / counts.clamp(min=1), torch.zeros_like(gated_output_norm_sum)
    )


def super_experts(
    output_max: dict[str, torch.Tensor], quantile: float = 0.995, fraction: float = 0.1,
    layers: Literal["first_75_percent", "all"] = "all",
) -> dict[str, list[int]]:
    """Experts whose peak activation exceeds max(quantile over all experts, global max * fraction); with
    `layers="first_75_percent"` only those of the first int(0.75 * L) layers count."""
    values = torch.cat([v.double().flatten() for v in output_max.values()])
    if values.numel() == 0 or float(values.max()) <= 0:
        return {path: [] for path in output_max}
    threshold = max(float(torch.quantile(values, quantile)), float(values.max()) * fraction)
    considered = len(output_max) if layers == "all" else int(len(output_max) * 0.75)
    return {
        path: torch.nonzero(v.double() > threshold).flatten().tolist() if index < considered else []
        for index, (path, v) in enumerate(output_max.items())
    }


def renormalises(layer: MoELayer) -> bool:
    """Whether the layer's config sets `norm_topk_prob` (read from the block, router or experts module)."""
    return any(bool(getattr(module, "norm_topk_prob", False)) for module in (layer.block, layer.router, layer.experts))


@dataclass
class REAPOptions:
    gate: Literal["reference", "applied"] = "reference"
    protect_super_experts: bool = False
    super_expert_layers: Literal["first_75_percent", "all"] = "first_75_percent"
    super_expert_peak: Literal["signed", "abs"] = "signed"
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
    group_aware = True
    Options = REAPOptions

    def validate(self, layers) -> None:
        super().validate(layers)
        self._counts(layers)

    def _counts(self, layers: list[MoELayer]) -> dict[str, int]:
        """`E - int(E * r)` per layer for `expert_sparsity` (the authors' rounding down), else the targets."""
        if self.config.expert_sparsity is None or self.config.experts_per_layer is not None:
            return uniform_counts(layers, self.config)
        counts = {}
        for layer in layers:
            counts[layer.path] = layer.num_experts - math.floor(layer.num_experts * self.config.expert_sparsity)
            check_layer_count(layer, counts[layer.path], self.config)
        return counts

    @property
    def needs(self) -> Needs:
        # super experts are found by one quantile over every layer's peaks: a global decision
        return Needs(statistics=True, global_decision=self.opts.protect_super_experts)

    def _gated_sum(self, layer: MoELayer, stats) -> torch.Tensor:
        if self.opts.gate == "applied" or renormalises(layer):
            return stats.gated_output_norm_sum
        if bool((stats.prob_pairs < stats.counts).any()):
            warnings.warn(
                f"REAP: {layer.path}'s router probabilities were not seen for every routed token; scoring with "
                "the applied gate (method_options gate='applied').",
                stacklevel=2,
            )
            return stats.gated_output_norm_sum
        return stats.prob_output_norm_sum

    def summarize(self, unit: Unit, observation: Observation) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per MoE layer: REAP scores and the peak activation per expert (all the decision needs)."""
        summary = {}
        for layer in unit.moe_layers:
            stats = observation.statistics[layer.path]
            peak = stats.output_signed_max if self.opts.super_expert_peak == "signed" else stats.output_max
            summary[layer.path] = (reap_scores(self._gated_sum(layer, stats), stats.counts), peak)
        return summary

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> tuple[dict, dict]:
        opts = self.opts
        counts = self._counts(layers)
        protected: dict[str, list[int]] = {layer.path: [] for layer in layers}
        if opts.protect_super_experts:
            peaks = {path: entry[1] for unit in summaries.values() for path, entry in unit.items()}
            protected = super_experts(peaks, opts.super_expert_quantile, opts.super_expert_fraction,
                                      opts.super_expert_layers)
        self.details = {"scores": {}, "super_experts": protected, "gate": opts.gate}
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
            # best first, super experts ahead; with expert groups, the best count/G of every group
            keep = keep_per_group(layer, shielded + [e for e in ranked if e not in shielded], counts[layer.path])
            result.plans[layer.path] = LayerPlan.keep(keep)
            self.details["scores"][layer.path] = [round(float(s), 6) for s in score]
        return result
