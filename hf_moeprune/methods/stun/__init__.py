"""STUN: structured-then-unstructured pruning. Experts by router-weight clustering, then Wanda/OWL on the weights.

Paper: Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (ACL 2025),
https://arxiv.org/abs/2409.06211, code https://github.com/thnkinbtfly/STUN. The defaults follow the code
(`merge_weight.py`); the option names are its README's flags, so its Arctic command reads
`method_options={"division_by_norm": False, "top_k": 127, "merge_max_clusters": 2, "distance": "coactivation",
"divide_mean": True, "threshold": 0.5}` with `num_experts_total=3570` (`--binary_search_target`).

Phase 1 (expert pruning, no forward pass for the router-weight distance):
  1. Distance between the experts of a layer (`select_expert_pairs`, l.55-73): Euclidean distance between
     router rows, divided by the router's Frobenius norm (`division_by_norm`); or, from calibration,
     `-C` with C the top-2 co-occurrence counts (`--load_path`, made by `assemble_logit_patterns.py`),
     optionally divided by |mean(C)| (`divide_mean`); or the mix `mix_weight * (-C / |mean C|) + cdist(W)`.
  2. Greedy clustering (`merge_method="greedy_but_reject_mixed"`, l.76-113): repeatedly take the globally
     closest remaining pair (v1, v2) below the threshold; join their clusters only if every distance from
     a member of C(v1) to v2 and from a member of C(v2) to v1 is below it, else blank that pair; stop when
     the layer is down to E - `top_k` clusters (`--top_k` caps the merges per layer, it is not the router's
     top-k). Accepted merges blank the distances they checked, one direction only, as the code does.
  3. One threshold for all layers, found by the code's step search (`__main__`, l.286-319): start at
     `threshold`, step 0.1, double the step until the total overshoots, then halve it, until the total
     number of clusters equals the target exactly (the code exits when ten trials give one total; here a
     ValueError). `uniform=True` (or `experts_per_layer`) runs each layer with threshold inf and the cap
     E - count, which is the code's default mode (`--threshold inf`).
  4. Each cluster keeps the member nearest the centroid of the members' flattened weights
     (`dsatur_select_mean_weight_merge`, l.172-186); a layer left with at most `merge_max_clusters` clusters
     averages every cluster instead (`dsatur_merge_experts`, l.157-170, and its router rows, l.119-136).
  5. Group-limited routing (DeepSeek-V3 / GLM-4.5 with `n_group` > 1; the reference has no such model):
     each routing group is clustered on its own, on the layer's distances (still divided by the whole
     router's norm), so merges stay inside a group and every group keeps the same count. `uniform`: each
     group keeps count / G. Global threshold: every group of a layer keeps as many clusters as the group
     that merged least under the threshold (the greedy merges are a sequence, the others stop after their
     first ones), so no group merges a pair the threshold does not allow; the total must then be a multiple
     of G (refused before any work otherwise). `top_k` merges per layer are shared as top_k // G per group;
     a layer keeps at least its router's top-k, rounded up to 2 per group.
Phase 2 (`weight_sparsity` or `nm_pattern` set): Wanda or OWL on the reduced model (see
`hf_moeprune.methods.unstructured`) over every linear of each decoder layer, routers included
(`targets="all_linear"`), as the reference's `prune_wanda_outlier` with `find_layers` (`OWL/lib/prune_all.py`
l.60-79, 818-1071; its Mixtral `gate` is an `nn.Linear`, `utils/modeling_mixtral.py` l.835). A router's
input norm is over every token of its layer. `targets="experts"` prunes inside the experts only.

Where this differs from the code, by choice:
  * `top_k` defaults to E - the router's top-k (the code's default is 1 merge per layer, its README uses
    E - 1): a layer must keep at least as many experts as its router picks to stay loadable.
  * The code compares float32 distances of the stored (bf16) router; here the router is read in float32.
  * `merge_method="complete"`: the earlier behaviour of this package, complete-linkage clusters under one
    threshold found by bisection (ties broken by layer order). Prefer it when the step search cannot hit
    the target exactly (the error says so) or when you want true complete linkage: every pair of a
    cluster below the threshold, whereas the greedy rule only checks distances to the joining pair.
  * `average_clusters_up_to`: average clusters of at most this many members (a per-cluster rule the code
    does not have; 0 = off).
  * Phase 2: a linear no calibration token reached (an expert never routed) is pruned by weight magnitude;
    the code skips it (`OWL/lib/prune_all.py` l.1006-1008, `NO SAMPLES`), leaving it dense.

Example:
    >>> model.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=0.25))   # no calibration needed
    >>> model.prune_experts(
    ...     MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.5, unstructured="owl"),
    ...     calibration=texts,
    ... )
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import check_layer_count, expert_groups, fewest_experts, total_budget, uniform_counts
from ..unstructured import WeightPruning, options_from_config
from ..wanda import OWLOptions
from .clustering import (
    Dendrogram,
    GroupedDendrogram,
    coactivation_distance,
    global_threshold_counts,
    greedy_clusters,
    grouped_greedy_clusters,
    mixed_distance,
    pick_representative,
    router_distance,
    step_search,
)

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit

__all__ = [
    "STUN",
    "Dendrogram",
    "GroupedDendrogram",
    "STUNOptions",
    "coactivation_distance",
    "global_threshold_counts",
    "greedy_clusters",
    "grouped_greedy_clusters",
    "mixed_distance",
    "pick_representative",
    "router_distance",
    "step_search",
]


def expert_features(layer: MoELayer) -> list[torch.Tensor]:
    """Every expert tensor of the layer (`[E, ...]` each): together, each expert's weights as one vector."""
    return list(layer.expert_tensors().values())


@dataclass
class STUNOptions(OWLOptions):
    """Phase-1 options, named as the reference's flags (see the module docstring); phase 2 prunes every
    linear of the decoder layer by default, as the reference's `find_layers` does."""

    targets: tuple[str, ...] = ("all_linear",)
    distance: Literal["router", "coactivation", "mix"] = "router"
    division_by_norm: bool = True
    divide_mean: bool = False
    mix_weight: float = 1.0
    merge_method: Literal["greedy_but_reject_mixed", "complete"] = "greedy_but_reject_mixed"
    threshold: float = 0.5
    top_k: int | None = None
    merge_max_clusters: int = 0
    representative: Literal["centroid", "router"] = "centroid"
    average_clusters_up_to: int = 0
    uniform: bool = False

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"STUN top_k (merges allowed per layer) must be at least 0, got {self.top_k}.")
        if self.merge_method == "complete" and (self.top_k is not None or self.merge_max_clusters):
            raise ValueError("STUN top_k and merge_max_clusters belong to merge_method='greedy_but_reject_mixed'.")


@register_method
class STUN(ExpertMethod):
    name = "stun"
    pretty_name = "STUN (structured-then-unstructured pruning)"
    paper = "https://arxiv.org/abs/2409.06211"
    kind = "prune"
    unstructured_phase = True
    group_aware = True
    Options = STUNOptions

    def __init__(self, config) -> None:
        super().__init__(config)
        self.uniform = self.opts.uniform or config.experts_per_layer is not None
        self.greedy = self.opts.merge_method == "greedy_but_reject_mixed"

    @property
    def has_phase2(self) -> bool:
        return bool(self.config.weight_sparsity) or self.config.nm_pattern is not None

    @property
    def needs(self) -> Needs:
        """The router-weight distance needs no data and, streaming, reads only the router rows first."""
        router_only = self.opts.distance == "router"
        return Needs(
            statistics=not router_only,
            global_decision=not self.uniform,
            summary_weights="router" if router_only else "all",
        )

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)  # option values are checked by STUNOptions
        if self.config.unstructured is not None and not self.has_phase2:
            raise ValueError(
                "unstructured= is set but weight_sparsity (or nm_pattern) is not: give the sparsity."
            )
        self._targets(layers)
        if self.has_phase2:
            options_from_config(self.config, self._algorithm(), self.opts)

    def _algorithm(self) -> str:
        return self.config.unstructured or ("wanda" if self.config.nm_pattern else "owl")

    def _targets(self, layers: list[MoELayer]) -> int | dict[str, int]:
        if self.uniform:
            return uniform_counts(layers, self.config)
        return total_budget(layers, self.config, per_group=True)

    def layer_distance(self, layer: MoELayer, observation: Observation | None) -> torch.Tensor:
        router = layer.router_tensors()["weight"]
        if self.opts.distance == "router":
            return router_distance(router, self.opts.division_by_norm)
        counts = observation.statistics[layer.path].coactivation
        if self.opts.distance == "coactivation":
            return coactivation_distance(counts, self.opts.divide_mean)
        return mixed_distance(counts, router, self.opts.mix_weight)

    def _max_merges(self, layer: MoELayer) -> int:
        """Merges allowed in each routing group: down to the layer's fewest experts, and the reference's
        `--top_k` merges per layer shared equally by the groups (all of them without group routing)."""
        groups = layer.num_expert_groups
        cap = (layer.num_experts - fewest_experts(layer, self.config)) // groups
        return cap if self.opts.top_k is None else min(self.opts.top_k // groups, cap)

    def summarize(self, unit: Unit, observation: Observation | None) -> dict[str, torch.Tensor | GroupedDendrogram]:
        """Per MoE layer: its distance matrix (greedy) or its routing groups' complete-linkage dendrograms."""
        distances = {layer.path: self.layer_distance(layer, observation) for layer in unit.moe_layers}
        if self.greedy:
            return distances
        return {
            layer.path: GroupedDendrogram.from_distance(distances[layer.path], expert_groups(layer))
            for layer in unit.moe_layers
        }

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> dict[str, int] | float:
        """The uniform per-layer counts, or the one global threshold (greedy) / per-layer counts (complete)."""
        self.details = {"distance": self.opts.distance, "merge_method": self.opts.merge_method,
                        "threshold": {}, "counts": {}, "clusters": {}}
        target = self._targets(layers)
        if isinstance(target, dict):
            return target
        found = {path: s for unit in summaries.values() for path, s in unit.items()}
        if self.greedy:
            groups = {layer.path: expert_groups(layer) for layer in layers}
            merges = {layer.path: self._max_merges(layer) for layer in layers}

            def total(threshold: float) -> int:
                return sum(len(grouped_greedy_clusters(found[p], groups[p], threshold, merges[p])) for p in merges)

            threshold = step_search(total, target, self.opts.threshold)
            self.details["threshold"] = threshold
            return threshold
        floors = {layer.path: fewest_experts(layer, self.config) for layer in layers}
        counts, threshold = global_threshold_counts(found, floors, target)
        for layer in layers:
            if counts[layer.path] < layer.num_experts:
                check_layer_count(layer, counts[layer.path], self.config)
        self.details["threshold"] = threshold
        return counts

    def _clusters(self, layer: MoELayer, summary: torch.Tensor | GroupedDendrogram, decision: dict | float) -> list:
        if not self.greedy:
            count = decision[layer.path]
            if self.uniform:
                self.details["threshold"][layer.path] = summary.height_of(count)
            return summary.clusters(count)
        groups = expert_groups(layer)
        if not self.uniform:
            return grouped_greedy_clusters(summary, groups, decision, self._max_merges(layer))
        count = decision[layer.path]
        clusters = grouped_greedy_clusters(summary, groups, float("inf"), (layer.num_experts - count) // len(groups))
        if len(clusters) != count:
            raise ValueError(
                f"STUN's greedy rule stops at {len(clusters)} clusters in {layer.path}, above the {count} asked: "
                "use method_options merge_method='complete'."
            )
        return clusters

    def reduce(self, unit: Unit, observation: Observation | dict | None, decision: dict | float) -> UnitResult:
        summaries = observation if not self.uniform else self.summarize(unit, observation)
        result = UnitResult()
        for layer in unit.moe_layers:
            clusters = self._clusters(layer, summaries[layer.path], decision)
            count = len(clusters)
            self.details["counts"][layer.path] = count
            self.details["clusters"][layer.path] = clusters
            if count == layer.num_experts:
                continue  # nothing removed in this layer
            if count < layer.num_experts:
                check_layer_count(layer, count, self.config)
            if count <= self.opts.merge_max_clusters:
                result.plans[layer.path] = LayerPlan(groups=clusters)  # every cluster averaged
                continue
            router = layer.router_tensors()["weight"]
            features = expert_features(layer) if self.opts.representative == "centroid" else [router]
            groups = [
                members if 1 < len(members) <= self.opts.average_clusters_up_to
                else [pick_representative(members, features)]
                for members in clusters
            ]
            result.plans[layer.path] = LayerPlan(groups=sorted(groups, key=lambda g: g[0]))
        return result

    def second_phase(self) -> WeightPruning | None:
        """Phase 2: Wanda / OWL on the decoder layers' weights (`targets`), on the model as phase 1 left it."""
        if not self.has_phase2:
            return None
        return WeightPruning(options_from_config(self.config, self._algorithm(), self.opts))
