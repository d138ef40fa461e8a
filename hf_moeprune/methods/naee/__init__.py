"""NAEE: exhaustive search, per layer, for the experts whose removal least changes the layer's output.

Paper: Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models" (ACL 2024), https://arxiv.org/abs/2402.14800, code Lucky-Lance/Expert_Sparsity.
For each MoE layer, with its calibration inputs X and the original model's output Z of that layer, try
every subset S of `n` experts to keep: the reduced layer F_S (the same surgery the final model gets: router
rows dropped, top-k renormalised as the family does) gives Z_S, and the subset minimising ||Z - Z_S||_F is
kept. C(E, n) subsets per layer: 28 or 70 for Mixtral's 8 experts; searches above `max_subsets` (default
10^4) per layer are refused before any calibration.

The default follows the authors' README command (`--method layerwise_pruning`,
`method/expert_pruning.py` `layerwise_pruning`, l.15-56, and `model/wrapper.py` `enumerate`, l.101-126):
one pass of the original model caches X and Z of every layer, all calibration tokens are used, and each
layer is searched on them. The code sums the norm over its calibration batches; here it is one norm over
all tokens (the same ranking for a single batch).

Options:
    inputs: `"original"` (default, `layerwise_pruning`) or `"pruned"` (`progressive_pruning`, l.59-109:
        X from the model with the earlier layers already pruned, the target still the original model's Z;
        two calibration passes). Prefer "pruned" when the earlier layers lose many experts, so each layer
        is chosen for the inputs it will really see.
    max_tokens: subsample this many calibration tokens for the search (default None: all of them, as the
        authors; set it when the search is too slow).
    max_subsets: default 10000.

Example:
    >>> model.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=6), calibration=texts)
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ...calibration.sequential import layer_output
from ...moe_layers import MoELayer
from ...surgery import LayerPlan, apply_layer_plan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import expert_groups, uniform_counts

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit


@torch.no_grad()
def candidate_subsets(layer: MoELayer, keep: int):
    """Every subset of `keep` experts, or with expert groups (group-limited routing) every subset that keeps
    `keep / G` experts of each group, so the result keeps the groups equal."""
    groups = expert_groups(layer)
    share = keep // len(groups)
    for parts in itertools.product(*(itertools.combinations(members, share) for members in groups)):
        yield tuple(e for part in parts for e in part)


def count_subsets(layer: MoELayer, keep: int) -> int:
    groups = expert_groups(layer)
    return math.prod(math.comb(len(members), keep // len(groups)) for members in groups)


def subset_formula(layer: MoELayer, keep: int) -> str:
    """`C(8, 4)`, or `C(4, 2)^2` when the subsets are taken per expert group."""
    groups = len(expert_groups(layer))
    if groups == 1:
        return f"C({layer.num_experts}, {keep})"
    return f"C({layer.num_experts // groups}, {keep // groups})^{groups}"


def search_layer(
    layer: MoELayer, inputs: torch.Tensor, keep: int, top_k: int | None = None, target: torch.Tensor | None = None
) -> tuple[list[int], float, int]:
    """Best subset of `keep` experts for one MoE block on `inputs` `[1, T, H]`: (subset, relative error, tried).

    `target` is the output to match (default: the unreduced block's output on `inputs`)."""
    reference = (layer_output(layer.block(inputs)) if target is None else target).float()
    scale = float(reference.norm()) or 1.0
    best: tuple[list[int], float] = ([], math.inf)
    tried = 0
    for subset in candidate_subsets(layer, keep):
        trial = MoELayer(path=layer.path, block=copy.deepcopy(layer.block), spec=layer.spec)
        apply_layer_plan(trial, LayerPlan.keep(subset), top_k)
        error = float((layer_output(trial.block(inputs)).float() - reference).norm()) / scale
        tried += 1
        if error < best[1]:
            best = (list(subset), error)
    return best[0], best[1], tried


def _sample(tokens: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """`max_tokens` rows spread evenly over the calibration tokens (all when None), as one `[1, T, H]` batch."""
    if max_tokens is not None and tokens.shape[0] > max_tokens:
        index = torch.linspace(0, tokens.shape[0] - 1, max_tokens).long()
        tokens = tokens[index]
    return tokens.unsqueeze(0)


@dataclass
class NAEEOptions:
    inputs: Literal["original", "pruned"] = "original"
    max_subsets: int = 10_000
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_subsets", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"option {name!r} of method 'naee' must be at least 1, got {getattr(self, name)}.")


@register_method
class NAEE(ExpertMethod):
    name = "naee"
    pretty_name = "NAEE (exhaustive expert-subset search)"
    paper = "https://arxiv.org/abs/2402.14800"
    kind = "prune"
    group_aware = True
    Options = NAEEOptions

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)
        counts = uniform_counts(layers, self.config)
        limit = self.opts.max_subsets
        for layer in layers:
            subsets = count_subsets(layer, counts[layer.path])
            if subsets > limit:
                raise ValueError(
                    f"NAEE would try {subset_formula(layer, counts[layer.path])} = {subsets:,} expert subsets in "
                    f"{layer.path}, above the limit of {limit:,}. Exhaustive search does not scale to this many "
                    "experts: use method='stun' (O(1) forward passes) or raise method_options max_subsets."
                )

    @property
    def needs(self) -> Needs:
        if self.opts.inputs == "original":
            return Needs(block_inputs=True)
        # progressive: a first pass keeps the original outputs, the second observes the pruned model
        return Needs(block_inputs=True, sequential=True, global_decision=True)

    def _inputs(self, layer: MoELayer, observation: Observation) -> torch.Tensor:
        parameter = next(layer.block.parameters())
        tokens = _sample(observation.block_inputs[layer.path], self.opts.max_tokens)
        return tokens.to(device=parameter.device, dtype=parameter.dtype)

    @torch.no_grad()
    def summarize(self, unit: Unit, observation: Observation) -> dict[str, torch.Tensor]:
        """The original model's output of each MoE block (the progressive search's target)."""
        return {layer.path: layer_output(layer.block(self._inputs(layer, observation))).cpu()
                for layer in unit.moe_layers}

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> tuple[dict[str, int], dict]:
        self.details = {"relative_error": {}, "block_evaluations": 0, "inputs": self.opts.inputs}
        targets = {path: z for unit in (summaries or {}).values() for path, z in unit.items()}
        return uniform_counts(layers, self.config), targets

    def reduce(self, unit: Unit, observation: Observation, decision: tuple[dict[str, int], dict]) -> UnitResult:
        counts, targets = decision
        result = UnitResult()
        for layer in unit.moe_layers:
            inputs = self._inputs(layer, observation)
            target = targets.get(layer.path)
            subset, error, tried = search_layer(
                layer, inputs, counts[layer.path], self.config.top_k,
                None if target is None else target.to(inputs.device),
            )
            result.plans[layer.path] = LayerPlan.keep(subset)
            self.details["relative_error"][layer.path] = round(error, 6)
            self.details["block_evaluations"] += tried
        return result
