"""STUN: structured-then-unstructured pruning. Experts by router-weight clustering, then Wanda/OWL inside.

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
Phase 2 (`weight_sparsity` or `nm_pattern` set): Wanda or OWL on the reduced model, see
`hf_moeprune.methods.unstructured`.

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

Example:
    >>> model.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=0.25))   # no calibration needed
    >>> model.prune_experts(
    ...     MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.5, unstructured="owl"),
    ...     calibration=texts,
    ... )
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    """Euclidean distance `[E, E]` between router rows (float32, as `select_expert_pairs` l.71), optionally
    divided by the router's Frobenius norm (l.72-73)."""
    w = router_weight.detach().float()
    d = torch.cdist(w, w)
    return d / w.norm().clamp(min=1e-12) if normalize else d


def coactivation_distance(coactivation: torch.Tensor, divide_mean: bool = False) -> torch.Tensor:
    """`-C` from the co-occurrence counts C of experts routed together (diagonal 0, as the reference's
    `assemble_logit_patterns.py` builds it), divided by |mean C| when `divide_mean` (l.55-67)."""
    c = coactivation.detach().float().clone()
    c.fill_diagonal_(0.0)
    d = -c
    return d / d.mean().abs().clamp(min=1e-12) if divide_mean else d


def mixed_distance(coactivation: torch.Tensor, router_weight: torch.Tensor, mix_weight: float) -> torch.Tensor:
    """`mix_weight * (-C / |mean C|) + cdist(W)` (l.59-63; the router part is never divided by its norm)."""
    return mix_weight * coactivation_distance(coactivation, True) + router_distance(router_weight, False)


def greedy_clusters(distance: torch.Tensor, threshold: float, max_merges: int) -> list[list[int]]:
    """The reference's `greedy_but_reject_mixed` clusters of one layer (`select_expert_pairs`, l.75-113).

    The closest remaining pair (v1, v2) joins its two clusters when every distance from C(v1) to v2 and
    from C(v2) to v1 is below `threshold` (those entries are then blanked); otherwise only that pair is
    blanked. Stops when no distance is below the threshold or after `max_merges` merges.
    """
    values = distance.detach().float().cpu().numpy().copy()  # numpy: the loop touches single entries
    n = values.shape[0]
    np.fill_diagonal(values, np.inf)
    cluster_of = [frozenset([e]) for e in range(n)]
    clusters = n
    while clusters > n - max_merges and float(values.min()) < threshold:
        v1, v2 = divmod(int(np.argmin(values)), n)  # first minimum in row-major order, as torch's argmin
        a, b = cluster_of[v1], cluster_of[v2]
        checked = [(c, v2) for c in a] + [(c, v1) for c in b]
        if all(values[i, j] < threshold for i, j in checked):
            for i, j in checked:
                values[i, j] = np.inf
            for e in a | b:
                cluster_of[e] = a | b
            clusters -= 1
        else:
            values[v1, v2] = values[v2, v1] = np.inf
    return sorted((sorted(c) for c in set(cluster_of)), key=lambda m: m[0])


def step_search(total: Callable[[float], int], target: int, start: float, step: float = 0.1) -> float:
    """The reference's threshold search (`merge_weight.py` `__main__`, l.286-319): move the threshold by
    `step` towards the target, doubling the step until the direction first flips, halving it after; a
    ValueError when ten trials in a row give the same total."""
    threshold, last, flipped, seen = start, 0, False, []
    while True:
        reached = total(threshold)
        if reached == target:
            return threshold
        direction = 1 if reached > target else -1
        seen.append(reached)
        if len(seen) > 10 and min(seen[-10:]) == max(seen[-10:]):
            raise ValueError(
                f"STUN's step search cannot reach exactly {target} experts (it stays at {reached}); "
                "choose another target, another start threshold, or method_options merge_method='complete' "
                "(exact by bisection)."
            )
        flipped = flipped or last * direction < 0
        step = step / 2 if flipped else step * 2
        threshold += step * direction
        last = direction


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

    # below every merge height (co-activation distances -C are negative) up to above all of them
    lo = min((float(d.heights.min()) for d in dendrograms.values() if d.heights.size), default=0.0) - 1.0
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


def pick_representative(members: list[int], features: Sequence[torch.Tensor], chunk: int = 1 << 22) -> int:
    """The member nearest the members' centroid, the features being the expert tensors `[E, ...]` taken
    together (all of an expert's weights as one vector, or its router row).

    The squared distance is summed over slices of `chunk` elements per member, in float64: a streamed
    layer's experts, most of its memory, are never copied whole.
    """
    squared = torch.zeros(len(members), dtype=torch.float64)
    for tensor in features:
        flat = tensor.detach()[members].reshape(len(members), -1)
        for start in range(0, flat.shape[1], chunk):
            x = flat[:, start : start + chunk].double()
            squared += (x - x.mean(0, keepdim=True)).pow(2).sum(1).cpu()
    return members[int(torch.argmin(squared))]


def expert_features(layer: MoELayer) -> list[torch.Tensor]:
    """Every expert tensor of the layer (`[E, ...]` each): together, each expert's weights as one vector."""
    return list(layer.expert_tensors().values())


# -------------------------------------------------------------------------------------------------- method


@dataclass
class STUNOptions(OWLOptions):
    """Phase-1 options, named as the reference's flags (see the module docstring)."""

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
            options_from_config(self.config, self._algorithm())

    def _algorithm(self) -> str:
        return self.config.unstructured or ("wanda" if self.config.nm_pattern else "owl")

    def _targets(self, layers: list[MoELayer]) -> int | dict[str, int]:
        if self.uniform:
            return uniform_counts(layers, self.config)
        return total_budget(layers, self.config)

    def layer_distance(self, layer: MoELayer, observation: Observation | None) -> torch.Tensor:
        router = layer.router_tensors()["weight"]
        if self.opts.distance == "router":
            return router_distance(router, self.opts.division_by_norm)
        counts = observation.statistics[layer.path].coactivation
        if self.opts.distance == "coactivation":
            return coactivation_distance(counts, self.opts.divide_mean)
        return mixed_distance(counts, router, self.opts.mix_weight)

    def _max_merges(self, layer: MoELayer) -> int:
        floor = effective_top_k(layer, self.config)
        cap = layer.num_experts - floor
        return cap if self.opts.top_k is None else min(self.opts.top_k, cap)

    def summarize(self, unit: Unit, observation: Observation | None) -> dict[str, torch.Tensor | Dendrogram]:
        """Per MoE layer: its distance matrix (greedy) or its complete-linkage dendrogram."""
        distances = {layer.path: self.layer_distance(layer, observation) for layer in unit.moe_layers}
        if self.greedy:
            return distances
        return {path: Dendrogram.from_distance(d) for path, d in distances.items()}

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> dict[str, int] | float:
        """The uniform per-layer counts, or the one global threshold (greedy) / per-layer counts (complete)."""
        self.details = {"distance": self.opts.distance, "merge_method": self.opts.merge_method,
                        "threshold": {}, "counts": {}, "clusters": {}}
        target = self._targets(layers)
        if isinstance(target, dict):
            return target
        found = {path: s for unit in summaries.values() for path, s in unit.items()}
        if self.greedy:
            merges = {layer.path: self._max_merges(layer) for layer in layers}

            def total(threshold: float) -> int:
                return sum(len(greedy_clusters(found[p], threshold, merges[p])) for p in merges)

            threshold = step_search(total, target, self.opts.threshold)
            self.details["threshold"] = threshold
            return threshold
        floors = {layer.path: effective_top_k(layer, self.config) for layer in layers}
        counts, threshold = global_threshold_counts(found, floors, target)
        for layer in layers:
            if counts[layer.path] < layer.num_experts:
                check_layer_count(layer, counts[layer.path], self.config)
        self.details["threshold"] = threshold
        return counts

    def _clusters(self, layer: MoELayer, summary: torch.Tensor | Dendrogram, decision: dict | float) -> list:
        if not self.greedy:
            count = decision[layer.path]
            if self.uniform:
                self.details["threshold"][layer.path] = float(summary.heights[summary.num_experts - count - 1])
            return summary.clusters(count)
        if not self.uniform:
            return greedy_clusters(summary, decision, self._max_merges(layer))
        count = decision[layer.path]
        clusters = greedy_clusters(summary, float("inf"), layer.num_experts - count)
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
        """Phase 2: Wanda / OWL inside the surviving experts, on the model as phase 1 left it."""
        if not self.has_phase2:
            return None
        return WeightPruning(options_from_config(self.config, self._algorithm()))
