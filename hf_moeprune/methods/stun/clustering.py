"""STUN's phase-1 arithmetic on one layer's numbers: distances, the reference's greedy clustering and threshold
search, complete-linkage dendrograms, routing-group budgets, representatives. Pure tensor code; the method
(`hf_moeprune.methods.stun`) decides which layer gets what.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

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


def grouped_greedy_clusters(
    distance: torch.Tensor, groups: Sequence[Sequence[int]], threshold: float, max_merges: int
) -> list[list[int]]:
    """`greedy_clusters` on each routing group's own distances, every group ending with the same count.

    Group-limited routing (DeepSeek-V3's `n_group`) needs equal groups, so each group keeps as many clusters
    as the group that merged least under `threshold`: no group merges a pair the threshold does not allow.
    The greedy merges are a sequence, so a group that could merge more stops after the first ones (the cap
    `size - share`). `max_merges` caps each group's merges. One group of every expert is the reference's rule.
    """
    blocks = [distance[list(g)][:, list(g)] for g in groups]
    found = [greedy_clusters(block, threshold, max_merges) for block in blocks]
    share = max(len(clusters) for clusters in found)
    result = []
    for members, block, clusters in zip(groups, blocks, found, strict=True):
        if len(clusters) < share:
            clusters = greedy_clusters(block, threshold, len(members) - share)
        result += [[members[i] for i in cluster] for cluster in clusters]
    return result


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


@dataclass
class GroupedDendrogram:
    """The dendrograms of a layer's routing groups, each clustered on its own (one group of every expert
    without group-limited routing). A layer's count is G times each group's, and under a threshold every
    group keeps the count of the group that merged least, as in `grouped_greedy_clusters`."""

    groups: list[list[int]]
    dendrograms: list[Dendrogram]

    @classmethod
    def from_distance(cls, distance: torch.Tensor, groups: Sequence[Sequence[int]]) -> GroupedDendrogram:
        members = [list(g) for g in groups]
        return cls(members, [Dendrogram.from_distance(distance[g][:, g]) for g in members])

    @property
    def num_experts(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def heights(self) -> np.ndarray:
        return np.sort(np.concatenate([d.heights for d in self.dendrograms]))

    def count_at(self, threshold: float, floor: int) -> int:
        """Clusters left under `threshold`, never below `floor` (a multiple of the number of groups)."""
        share_floor = floor // len(self.groups)
        return len(self.groups) * max(d.count_at(threshold, share_floor) for d in self.dendrograms)

    def clusters(self, count: int) -> list[list[int]]:
        share = count // len(self.groups)
        return [[members[i] for i in cluster]
                for members, d in zip(self.groups, self.dendrograms, strict=True) for cluster in d.clusters(share)]

    def height_of(self, count: int) -> float:
        """The highest merge height used to reach `count` clusters."""
        share = count // len(self.groups)
        return max(float(d.heights[d.num_experts - share - 1]) for d in self.dendrograms)


def global_threshold_counts(
    dendrograms: dict[str, Dendrogram | GroupedDendrogram], floors: dict[str, int], target: int, iterations: int = 100
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

    The squared distance is summed over slices of `chunk` elements per member, each slice gathered from the
    members' rows alone: a streamed layer's experts, most of its memory, are never copied whole. A slice is
    centred and summed in float32 (torch sums in blocks, so its relative error stays near 1e-7, far below
    the gaps between members of real or random weights) and the slices' sums add up in float64; float32
    halves the memory traffic of float64, which was most of STUN's time. One or two members need no reading:
    two are always equidistant from their midpoint, and an exact tie keeps the first, as `argmin` does.
    """
    if len(members) <= 2:
        return members[0]
    index = torch.tensor(members)
    squared = torch.zeros(len(members), dtype=torch.float64)
    for tensor in features:
        rows = tensor.detach().reshape(tensor.shape[0], -1)
        index = index.to(rows.device)
        for start in range(0, rows.shape[1], chunk):
            x = rows[:, start : start + chunk].index_select(0, index).float()
            x -= x.mean(0, keepdim=True)
            squared += x.square_().sum(1).double().cpu()
    return members[int(torch.argmin(squared))]
