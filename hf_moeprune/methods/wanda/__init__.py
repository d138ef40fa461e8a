"""Wanda alone: zero the weights with the lowest |W_ij| * ||X_j||_2 in every output row, experts untouched.

Paper: https://arxiv.org/abs/2306.11695. Inputs are collected layer by layer (each layer sees the already
pruned earlier layers); an expert's inputs are the tokens routed to it.

Options (`MoEPruneConfig.method_options`): `targets` (list or comma string of `experts`, `router`,
`attention`, `dense_mlp`, `all_linear` = all of them; default `experts`), `sequential` (default True).

Example:
    >>> model.prune_experts(MoEPruneConfig(method="wanda", weight_sparsity=0.5), calibration=texts)
    >>> model.prune_experts(MoEPruneConfig(method="wanda", nm_pattern=(2, 4)), calibration=texts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from ...moe_layers import MoELayer
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..unstructured import WeightPruning, options_from_config

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


@dataclass
class WandaOptions:
    targets: tuple[str, ...] = ("experts",)
    sequential: bool = True


@dataclass
class OWLOptions(WandaOptions):
    owl_m: float = 3.0
    owl_lambda: float = 0.08
    owl_balance: Literal["mean", "size_weighted"] = "mean"


class UnstructuredMethod(ExpertMethod):
    """Shared body of the weight-only baselines."""

    kind = "unstructured"
    algorithm = "wanda"
    Options = WandaOptions

    def validate(self, layers) -> None:
        super().validate(layers)
        if self.config.has_expert_target:
            raise ValueError(
                f"Method {self.name!r} prunes weights only and ignores expert targets; use method='stun' "
                "to remove experts first."
            )
        if self.config.weight_sparsity is None and self.config.nm_pattern is None:
            raise ValueError(f"Method {self.name!r} needs weight_sparsity (or nm_pattern).")
        options_from_config(self.config, self.algorithm, self.opts)  # option errors before calibration

    def __init__(self, config) -> None:
        super().__init__(config)
        self.engine = WeightPruning(options_from_config(config, self.algorithm, self.opts), self.name)

    @property
    def needs(self) -> Needs:
        return self.engine.needs

    def linear_targets(self, unit: Unit) -> dict[str, nn.Module]:
        return self.engine.linear_targets(unit)

    def summarize(self, unit: Unit, observation: Observation) -> tuple:
        return self.engine.summarize(unit, observation)

    def decide(self, summaries: dict | None, layers: list[MoELayer]) -> dict[str, float] | None:
        decision = self.engine.decide(summaries, layers)
        self.details = self.engine.details
        return decision

    def reduce(self, unit: Unit, observation: Observation | tuple, decision: dict | None) -> UnitResult:
        result = self.engine.reduce(unit, observation, decision)
        self.details = self.engine.details
        return result


@register_method
class Wanda(UnstructuredMethod):
    name = "wanda"
    pretty_name = "Wanda (pruning by weights and activations)"
    paper = "https://arxiv.org/abs/2306.11695"
    algorithm = "wanda"
