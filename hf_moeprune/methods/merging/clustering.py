"""Grouping one layer's experts into exactly `k` non-empty clusters, deterministically under a seed.

Every clusterer returns groups with the anchor (the member routing the most calibration tokens) first, and
groups ordered by anchor index. A cluster of one is an expert kept as it is.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

CLUSTERINGS = ("spectral", "kmeans", "agglomerative", "dominant")


def cluster_experts(
    similarity: torch.Tensor,
    k: int,
    method: str,
    *,
    frequency: torch.Tensor,
    features: torch.Tensor | None = None,
    linkage: str = "average",
    seed: int = 0,
) -> list[list[int]]:
    """Cluster `E` experts into `k` groups.

    Args:
        similarity: `[E, E]` similarity in [-1, 1] (see `similarity.py`).
        k: Number of groups, 1 <= k <= E.
        method: `"spectral"` (scikit-learn spectral clustering on the precomputed affinity (sim + 1) / 2),
            `"kmeans"` (k-means on `features`, e.g. router-logit profiles), `"agglomerative"` (hierarchical
            clustering, Euclidean on `features` when given as HC-SMoE does, else on 1 - similarity) or
            `"dominant"` (MC-SMoE: the `k` most frequent experts lead, every other expert joins its most
            similar leader).
        frequency: `[E]` routed-token counts; picks anchors and the dominant experts.
        features: `[E, F]` expert vectors for k-means / Euclidean agglomerative clustering.
        linkage: Linkage of agglomerative clustering (`"average"`, `"complete"`, `"single"`, `"ward"`).
        seed: Seeds spectral clustering and k-means.
    """
    num = similarity.shape[0]
    if not 1 <= k <= num:
        raise ValueError(f"Cannot cluster {num} experts into {k} groups.")
    sim = similarity.double().numpy()
    freq = frequency.double().numpy()
    if k == num:
        labels = np.arange(num)
    elif k == 1:
        labels = np.zeros(num, dtype=np.int64)
    elif method == "dominant":
        leaders = np.argsort(-freq, kind="stable")[:k]
        labels = np.empty(num, dtype=np.int64)
        for e in range(num):
            labels[e] = np.argmax(sim[e, leaders])
        labels[leaders] = np.arange(k)
    elif method == "spectral":
        from sklearn.cluster import SpectralClustering

        affinity = np.clip((sim + 1.0) / 2.0, 0.0, 1.0)
        np.fill_diagonal(affinity, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = SpectralClustering(
                n_clusters=k, affinity="precomputed", random_state=seed, n_init=10, assign_labels="kmeans"
            ).fit_predict(affinity)
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        if features is None:
            raise ValueError("k-means clustering needs expert features.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features.double().numpy())
    elif method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        if features is not None:
            labels = AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(
                features.double().numpy()
            )
        else:
            if linkage == "ward":
                raise ValueError("Ward linkage needs expert features, not a similarity.")
            distance = np.clip(1.0 - sim, 0.0, None)
            np.fill_diagonal(distance, 0.0)
            labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit_predict(
                distance
            )
    else:
        raise ValueError(f"Unknown clustering {method!r}: use one of {', '.join(CLUSTERINGS)}.")
    groups = _groups_from_labels(np.asarray(labels), freq)
    groups = _repair_to_k(groups, k, sim, freq)
    return sorted(groups, key=lambda g: g[0])


def _groups_from_labels(labels: np.ndarray, freq: np.ndarray) -> list[list[int]]:
    groups = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        groups.append(_anchor_first(members, freq))
    return groups


def _anchor_first(members: list[int], freq: np.ndarray) -> list[int]:
    """The most frequent member first (lowest index on ties), the others in index order."""
    anchor = min(members, key=lambda e: (-freq[e], e))
    return [anchor] + sorted(e for e in members if e != anchor)


def _repair_to_k(groups: list[list[int]], k: int, sim: np.ndarray, freq: np.ndarray) -> list[list[int]]:
    """Clusterers can return fewer than `k` distinct labels (identical experts): split off, from the largest
    group, the member least similar to its anchor until there are `k` groups."""
    groups = [list(g) for g in groups]
    while len(groups) < k:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -groups[i][0]))
        group = groups[largest]
        outcast = min(group[1:], key=lambda e: (sim[group[0], e], -e))
        group.remove(outcast)
        groups.append([outcast])
    if len(groups) > k:
        raise RuntimeError(f"Clustering returned {len(groups)} groups, more than the {k} asked for.")
    return [_anchor_first(g, freq) for g in groups]
