"""STUN: structured-then-unstructured pruning. Experts by router-weight clustering, then Wanda/OWL inside.

Paper: Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (ACL 2025),
https://arxiv.org/abs/2409.06211, code https://github.com/thnkinbtfly/STUN.

Phase 1 (expert pruning, O(1) forward passes; none for the router-weight distance):
  1. Distance between the experts of a layer: Euclidean distance between their router rows (divided by the
     router's Frobenius norm so one threshold fits every layer), or `1 - C_ij / sqrt(C_ii C_jj)` from the
     co-activation counts C of calibration tokens routed to both, or a mix of the two.
  2. Agglomerative clustering with complete linkage under ONE global threshold t: within a layer, experts
     whose every pair is closer than t end up together. t is found by bisection so that the clusters summed
     over all layers hit the expert budget; layers with more redundancy lose more experts (non-uniform
     counts), never going below the router's top-k.
  3. Each cluster keeps one representative: the member nearest the cluster's weight centroid. By a first-order
     Taylor argument, removing similar experts and keeping the central one perturbs the layer output least.
     Option: average the members of small clusters instead.
Phase 2 (`weight_sparsity` or `nm_pattern` set): Wanda or OWL inside the surviving experts (and optionally
attention / dense MLPs), inputs collected layer by layer on the reduced model (`second_phase`).

Options (`MoEPruneConfig.method_options`):
    distance: `"router"` (default, data-free), `"coactivation"` or `"mix"`.
    mix_alpha: weight of the router distance in `"mix"` (default 0.5); both parts are divided by their
        mean off-diagonal value first.
    normalize: divide router distances by the router's Frobenius norm (default True).
    representative: `"centroid"` (expert nearest the cluster's weight centroid, default) or `"router"`
        (nearest the centroid of the members' router rows).
    average_clusters_up_to: clusters of at most this many experts are averaged into one expert instead of
        keeping a representative (default 0: never).
    uniform: force the same count in every layer (per-layer thresholds); implied by `experts_per_layer`.
    targets, owl_m, owl_lambda, sequential: phase-2 options, see `hf_moeprune.methods.unstructured`.

Example:
    >>> model.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=0.25))   # no calibration needed
    >>> model.prune_experts(
    ...     MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.5, unstructured="owl"),
    ...     calibration=texts,
    ... )
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..registry import register_method
from ..targets import check_layer_count, effective_top_k, total_budget, uniform_counts
from ..unstructured import WeightPruning, options_from_config
from ..wanda import OWLOptions

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit

# ---------------------------------------------------------------------------------------------- distance


def router_distance(router_weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Euclidean distance `[E, E]` between router rows, optionally divided by the router's Frobenius norm."""
    w = router_weight.detach().double()
    d = torch.cdist(w, w)
    return d / w.norm().clamp(min=1e-12) if normalize else d


def coactivation_distance(coactivation: torch.Tensor) -> torch.Tensor:
    """`1 - C_ij / sqrt(C_ii C_jj)`: 0 for experts always routed together, 1 for never together."""
    c = coactivation.double()
    diag = c.diagonal().clamp(min=1e-12)
    d = 1.0 - c / torch.sqrt(torch.outer(diag, diag))
    d.fill_diagonal_(0.0)
    return d.clamp(min=0.0)


def _mean_offdiag(d: torch.Tensor) -> float:
    n = d.shape[0]
    return float(d.sum() / max(n * (n - 1), 1)) or 1.0


# -------------------------------------------------------------------------------------------- clustering


@dataclass
class Dendrogram:
    """Complete-linkage merges of one layer: `merges[i] = (a, b)` in scipy's cluster ids, heights ascending."""

    num_experts: int
    merges: np.ndarray
    heights: np.ndarray

    @classmethod
    def from_distance(cls, distance: torch.Tensor) -> Dendrogram:
        d = distance.detach().double().cpu().numpy()
        d = (d + d.T) / 2
        np.fill_diagonal(d, 0.0)
        z = linkage(squareform(d, checks=False), method="complete")
        # complete linkage heights are monotone; the maximum guards against float round-off
        return cls(
            num_experts=d.shape[0], merges=z[:, :2].astype(int), heights=np.maximum.accumulate(z[:, 2])
        )

    def count_at(self, threshold: float, floor: int) -> int:
        """Clusters left when merging every pair of clusters closer than `threshold`, never below `floor`."""
        return max(floor, self.num_experts - int(np.sum(self.heights <= threshold)))

    def clusters(self, count: int) -> list[list[int]]:
        """The clusters after the first `num_experts - count` merges (sorted by smallest member)."""
        members: dict[int, list[int]] = {e: [e] for e in range(self.num_experts)}
        for step in range(self.num_experts - count):
            a, b = (int(v) for v in self.merges[step])
            members[self.num_experts + step] = members.pop(a) + members.pop(b)
        return sorted((sorted(m) for m in members.values()), key=lambda m: m[0])


def global_threshold_counts(
    dendrograms: dict[str, Dendrogram], floors: dict[str, int], target: int, iterations: int = 100
) -> tuple[dict[str, int], float]:
    """Per-layer cluster counts under one global threshold, found by bisection to total `target`.

    Counts are step functions of the threshold; where several merges share the threshold height (ties), the
    ones in earlier layers are taken first so the total is exactly `target`.
    """
    paths = list(dendrograms)

    def total(t: float) -> int:
        return sum(dendrograms[p].count_at(t, floors[p]) for p in paths)

    lo = -1.0
    hi = max((float(d.heights.max()) for d in dendrograms.values() if d.heights.size), default=0.0) + 1.0
    if total(hi) > target:
        raise ValueError(
            f"Cannot reach {target} experts: the per-layer top-k floors allow {total(hi)} at least."
        )
    for _ in range(iterations):  # invariant: total(lo) > target >= total(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > target else (lo, mid)
    # the critical merge height: the smallest one above `lo` (bisection brackets it, lo < t <= hi)
    heights = np.concatenate([d.heights for d in dendrograms.values()] + [np.array([hi])])
    threshold = float(heights[heights > lo].min())
    # strictly below the threshold: taken; at the threshold: taken in layer order until the target is met
    counts = {p: dendrograms[p].count_at(np.nextafter(threshold, -np.inf), floors[p]) for p in paths}
    excess = sum(counts.values()) - target
    for p in paths:
        if excess <= 0:
            break
        reachable = dendrograms[p].count_at(threshold, floors[p])
        take = min(excess, counts[p] - reachable)
        counts[p] -= take
        excess -= take
    return counts, float(threshold)


def pick_representative(members: list[int], features: Sequence[torch.Tensor]) -> int:
    """The member nearest the members' centroid, the features being the expert tensors `[E, ...]` taken
    together (all of an expert's weights as one vector, or its router row).

    The distance is summed tensor by tensor, so only the members' slice of one tensor is ever converted to
    float64: a layer's experts are never copied whole (they are most of a streamed layer's memory).
    """
    squared = torch.zeros(len(members), dtype=torch.float64)
    for tensor in features:
        x = tensor[members].detach().double().reshape(len(members), -1)
        squared += (x - x.mean(0, keepdim=True)).pow(2).sum(1).cpu()
    return members[int(torch.argmin(squared))]


def expert_features(layer: MoELayer) -> list[torch.Tensor]:
    """Every expert tensor of the layer (`[E, ...]` each): together, each expert's weights as one vector."""
    return list(layer.expert_tensors().values())


# -------------------------------------------------------------------------------------------------- method


@dataclass
class STUNOptions(OWLOptions):
    distance: Literal["router", "coactivation", "mix"] = "router"
    mix_alpha: float = 0.5
    normalize: bool = True
    representative: Literal["centroid", "router"] = "centroid"
    average_clusters_up_to: int = 0
    uniform: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise ValueError(f"STUN mix_alpha must be in [0, 1], got {self.mix_alpha}.")


@register_method
class STUN(ExpertMethod):
    name = "stun"
    pretty_name = "STUN (structured-then-unstructured pruning)"
    paper = "https://arxiv.org/abs/2409.06211"
    kind = "prune"
    unstructured_phase = True
    Options = STUNOptions

    def __init__(self, config) -> None:
        super().__init__(config)
        opts = self.opts
        self.distance = opts.distance
        self.mix_alpha = opts.mix_alpha
        self.normalize = opts.normalize
        self.representative = opts.representative
        self.average_up_to = opts.average_clusters_up_to
        self.uniform = opts.uniform or config.experts_per_layer is not None

    @property
    def has_phase2(self) -> bool:
        return bool(self.config.weight_sparsity) or self.config.nm_pattern is not None

    @property
    def needs(self) -> Needs:
        """The router-weight distance needs no data and, streaming, reads only the router rows first."""
        return Needs(
            statistics=self.distance != "router",
            global_decision=not self.uniform,
            summary_weights="router" if self.distance == "router" else "all",
        )

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)  # distance, representative and mix_alpha are checked by STUNOptions
        if self.config.unstructured is not None and not self.has_phase2:
            raise ValueError(
                "unstructured= is set but weight_sparsity (or nm_pattern) is not: give the sparsity."
            )
        self._targets(layers)
        if self.has_phase2:
            options_from_config(self.config, self._algorithm())

    def _algorithm(self) -> str:
        return self.config.unstructured or ("wanda" if self.config.nm_pattern else "owl")

    def _targets(self, layers: list[MoELayer]) -> int | dict[str, int]:
        if self.uniform:
            return uniform_counts(layers, self.config)
        return total_budget(layers, self.config)

    def layer_distance(self, layer: MoELayer, observation: Observation | None) -> torch.Tensor:
        router = (
            router_distance(layer.router_tensors()["weight"], self.normalize)
            if self.distance != "coactivation"
            else None
        )
        if self.distance == "router":
            return router
        co = coactivation_distance(observation.statistics[layer.path].coactivation)
        if self.distance == "coactivation":
            return co
        return self.mix_alpha * router / _mean_offdiag(router) + (1 - self.mix_alpha) * co / _mean_offdiag(co)

    def summarize(self, unit: Unit, observation: Observation | None) -> dict[str, Dendrogram]:
        return {layer.path: Dendrogram.from_distance(self.layer_distance(layer, observation)) for layer in unit.moe_layers}

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> dict[str, int]:
        """Per-layer cluster counts: the uniform target, or one global threshold over every dendrogram."""
        self.details = {"distance": self.distance, "threshold": {}, "counts": {}, "clusters": {}}
        target = self._targets(layers)
        if isinstance(target, dict):
            return target
        dendrograms = {path: d for unit in summaries.values() for path, d in unit.items()}
        floors = {layer.path: effective_top_k(layer, self.config) for layer in layers}
        counts, threshold = global_threshold_counts(dendrograms, floors, target)
        for layer in layers:
            if counts[layer.path] < layer.num_experts:
                check_layer_count(layer, counts[layer.path], self.config)
        self.details["threshold"] = threshold
        return counts

    def reduce(self, unit: Unit, observation: Observation | dict | None, counts: dict[str, int]) -> UnitResult:
        dendrograms = observation if not self.uniform else self.summarize(unit, observation)
        result = UnitResult()
        for layer in unit.moe_layers:
            dendrogram = dendrograms[layer.path]
            count = counts[layer.path]
            clusters = dendrogram.clusters(count)
            self.details["counts"][layer.path] = count
            self.details["clusters"][layer.path] = clusters
            if self.uniform:
                self.details["threshold"][layer.path] = float(dendrogram.heights[dendrogram.num_experts - count - 1])
            if count == layer.num_experts:
                continue  # nothing removed in this layer
            features = expert_features(layer) if self.representative == "centroid" else [layer.router_tensors()["weight"]]
            groups = [
                members if 1 < len(members) <= self.average_up_to else [pick_representative(members, features)]
                for members in clusters
            ]
            result.plans[layer.path] = LayerPlan(groups=sorted(groups, key=lambda g: g[0]))
        return result

    def second_phase(self) -> WeightPruning | None:
        """Phase 2: Wanda / OWL inside the surviving experts, on the model as phase 1 left it."""
        if not self.has_phase2:
            return None
        return WeightPruning(options_from_config(self.config, self._algorithm()))
