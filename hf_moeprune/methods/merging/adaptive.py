"""Non-uniform per-layer expert counts under one global budget (UNCURL's "adaptive" pruning).

Two rules:

- `redundancy_counts`: a layer whose experts are alike can lose more of them. Per layer, average-linkage
  clustering on the distance 1 - similarity gives the heights at which experts would merge, h_1 <= h_2 <= ...
  (removing m experts costs the m-th merge height). Globally, the cheapest removals are taken until the budget
  is met, which takes a prefix of each layer's merges, so the counts are consistent with what the clustering
  step then does. Cosine distances are on one scale in every layer, so heights compare across layers.
- `frequency_counts`: MC-SMoE's global rule (UNITES-Lab/MC-SMoE `mcsmoe/merging/grouping_mixtral.py`
  `_assign_num_groups_per_layer`, l.91-135). Each expert's share of its layer's routed tokens; a layer's most
  used experts are lifted to 1.0 so it keeps them; the threshold is the (budget + 1)-th largest value over all
  layers, and a layer keeps the experts strictly above it, so shares tied at the threshold all fall below it
  and the total can end under the budget, as in the reference. `exact=True` (our earlier rule) fills the budget
  exactly instead, tied shares taken in layer order.

Both keep at least `floors[layer]` experts per layer (the router's top-k). MC-SMoE lifts one expert per layer;
lifting the top-k ones changes nothing where the reference already keeps top-k in every layer, and elsewhere
keeps the layer loadable with a folded router.
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
    frequencies: dict[str, torch.Tensor], budget: int, floors: dict[str, int], exact: bool = False
) -> dict[str, int]:
    order = list(frequencies)
    if sum(floors.values()) > budget:
        raise ValueError(f"A budget of {budget} experts leaves some layer below its top-k.")
    lifted = {}
    for path in order:
        share = frequencies[path].double()
        share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / len(share))
        share[torch.argsort(share, descending=True, stable=True)[: floors[path]]] = 1.0
        lifted[path] = share
    if not exact:
        threshold = torch.sort(torch.cat(list(lifted.values())), descending=True).values[budget]
        return {path: int((lifted[path] > threshold).sum()) for path in order}
    candidates = [(-value, rank, path) for rank, path in enumerate(order) for value in lifted[path].tolist()]
    counts = dict.fromkeys(order, 0)
    for _, _, path in sorted(candidates)[:budget]:
        counts[path] += 1
    return counts
