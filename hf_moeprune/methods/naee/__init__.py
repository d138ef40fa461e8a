"""NAEE: exhaustive search, per layer, for the experts whose removal least changes the layer's output.

Paper: Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models" (ACL 2024), https://arxiv.org/abs/2402.14800, code Lucky-Lance/Expert_Sparsity.
For each MoE layer, with the calibration inputs X of that layer (collected layer by layer, so they come
from the already pruned earlier layers) and its output Z = F(X), try every subset S of `n` experts to keep:
the reduced layer F_S (the same surgery the final model gets: router rows dropped, top-k renormalised as
the family does) gives Z_S, and the subset minimising ||Z - Z_S||_F is kept. C(E, n) subsets per layer: 28
or 70 for Mixtral's 8 experts; searches above `max_subsets` (default 10^4) per layer are refused before
any calibration.

Options: `max_subsets` (default 10000), `max_tokens` (calibration tokens used for the search, default 4096).

Example:
    >>> model.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=6), calibration=texts)
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...calibration.sequential import layer_output
from ...moe_layers import MoELayer
from ...surgery import LayerPlan, apply_layer_plan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


@torch.no_grad()
def search_layer(
    layer: MoELayer, inputs: torch.Tensor, keep: int, top_k: int | None = None
) -> tuple[list[int], float, int]:
    """Best subset of `keep` experts for one MoE block on `inputs` `[1, T, H]`: (subset, relative error, tried)."""
    reference = layer_output(layer.block(inputs)).float()
    scale = float(reference.norm()) or 1.0
    best: tuple[list[int], float] = ([], math.inf)
    tried = 0
    for subset in itertools.combinations(range(layer.num_experts), keep):
        trial = MoELayer(path=layer.path, block=copy.deepcopy(layer.block), spec=layer.spec)
        apply_layer_plan(trial, LayerPlan.keep(subset), top_k)
        error = float((layer_output(trial.block(inputs)).float() - reference).norm()) / scale
        tried += 1
        if error < best[1]:
            best = (list(subset), error)
    return best[0], best[1], tried


def _sample(tokens: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """`max_tokens` rows spread evenly over the calibration tokens, as one `[1, T, H]` batch."""
    if tokens.shape[0] > max_tokens:
        index = torch.linspace(0, tokens.shape[0] - 1, max_tokens).long()
        tokens = tokens[index]
    return tokens.unsqueeze(0)


@dataclass
class NAEEOptions:
    max_subsets: int = 10_000
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_subsets", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} of method 'naee' must be at least 1, got {getattr(self, name)}.")


@register_method
class NAEE(ExpertMethod):
    name = "naee"
    pretty_name = "NAEE (exhaustive expert-subset search)"
    paper = "https://arxiv.org/abs/2402.14800"
    kind = "prune"
    Options = NAEEOptions

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)
        counts = uniform_counts(layers, self.config)
        limit = self.opts.max_subsets
        for layer in layers:
            subsets = math.comb(layer.num_experts, counts[layer.path])
            if subsets > limit:
                raise ValueError(
                    f"NAEE would try C({layer.num_experts}, {counts[layer.path]}) = {subsets:,} expert subsets in "
                    f"{layer.path}, above the limit of {limit:,}. Exhaustive search does not scale to this many "
                    "experts: use method='stun' (O(1) forward passes) or raise method_options max_subsets."
                )

    @property
    def needs(self) -> Needs:
        # each layer is searched on the outputs of the already pruned layers before it, as in the paper
        return Needs(block_inputs=True, sequential=True)

    def decide(self, summaries: None, layers: list[MoELayer]) -> dict[str, int]:
        self.details = {"relative_error": {}, "block_evaluations": 0}
        return uniform_counts(layers, self.config)

    def reduce(self, unit: Unit, observation: Observation, counts: dict[str, int]) -> UnitResult:
        result = UnitResult()
        for layer in unit.moe_layers:
            inputs = _sample(observation.block_inputs[layer.path], self.opts.max_tokens)
            dtype = next(layer.block.parameters()).dtype
            device = next(layer.block.parameters()).device
            subset, error, tried = search_layer(
                layer, inputs.to(device=device, dtype=dtype), counts[layer.path], self.config.top_k
            )
            result.plans[layer.path] = LayerPlan.keep(subset)
            self.details["relative_error"][layer.path] = round(error, 6)
            self.details["block_evaluations"] += tried
        return result
