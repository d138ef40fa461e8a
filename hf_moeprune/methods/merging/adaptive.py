"""Non-uniform per-layer expert counts under one global budget (UNCURL's "adaptive" pruning).

Two rules:

- `redundancy_counts`: a layer whose experts are alike can lose more of them. Per layer, average-linkage
  clustering on the distance 1 - similarity gives the heights at which experts would merge, h_1 <= h_2 <= ...
  (removing m experts costs the m-th merge height). Globally, the cheapest removals are taken until the budget
  is met, which takes a prefix of each layer's merges, so the counts are consistent with what the clustering
  step then does. Cosine distances are on one scale in every layer, so heights compare across layers.
- `frequency_counts`: MC-SMoE's global rule. Experts are ranked over all layers by their share of their layer's
  routed tokens; the `budget` highest are "dominant", and a layer keeps as many experts as it has dominant ones.

Both keep at least `floors[layer]` experts per layer (the router's top-k).
"""

from __future__ import annotations

import numpy as np
import torch


def redundancy_counts(
    similarities: dict[str, torch.Tensor], budget: int, floors: dict[str, int]
) -> dict[str, int]:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    order = list(similarities)
    total = sum(s.shape[0] for s in similarities.values())
    removals = total - budget
    candidates = []
    for rank, path in enumerate(order):
        sim = similarities[path].double().numpy()
        num = sim.shape[0]
        distance = np.clip(1.0 - sim, 0.0, None)
        distance = (distance + distance.T) / 2
        np.fill_diagonal(distance, 0.0)
        heights = np.maximum.accumulate(linkage(squareform(distance, checks=False), method="average")[:, 2])
        for m in range(1, num - floors[path] + 1):
            candidates.append((float(heights[m - 1]), m, rank, path))
    if removals > len(candidates):
        raise ValueError(f"A budget of {budget} experts leaves some layer below its top-k.")
    candidates.sort()
    counts = {path: similarities[path].shape[0] for path in order}
    for _, _, _, path in candidates[:removals]:
        counts[path] -= 1
    return counts


def frequency_counts(
    frequencies: dict[str, torch.Tensor], budget: int, floors: dict[str, int]
) -> dict[str, int]:
    order = list(frequencies)
    counts = {path: floors[path] for path in order}
    remaining = budget - sum(counts.values())
    if remaining < 0:
        raise ValueError(f"A budget of {budget} experts leaves some layer below its top-k.")
    candidates = []
    for rank, path in enumerate(order):
        share = frequencies[path].double()
        share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / len(share))
        ranked = torch.sort(share, descending=True, stable=True).values.tolist()
        candidates += [(-value, rank, path) for value in ranked[floors[path] :]]
    candidates.sort()
    for _, _, path in candidates[:remaining]:
        counts[path] += 1
    return counts
