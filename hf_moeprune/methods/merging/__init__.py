"""Shared pieces of the expert-merging methods: similarity, clustering, permutation alignment, adaptive counts,
and the cluster -> align -> merge pipeline. A plain package: nothing here is registered as a method."""

from .adaptive import frequency_counts, redundancy_counts
from .alignment import (
    align_groups,
    alignment_score,
    num_units,
    permute_expert_units,
    solve_assignment,
    unit_activation_features,
    unit_weight_features,
)
from .clustering import cluster_experts
from .pipeline import ClusterMergeMethod
from .similarity import expert_features, expert_similarity

__all__ = [
    "ClusterMergeMethod",
    "align_groups",
    "alignment_score",
    "cluster_experts",
    "expert_features",
    "expert_similarity",
    "frequency_counts",
    "num_units",
    "permute_expert_units",
    "redundancy_counts",
    "solve_assignment",
    "unit_activation_features",
    "unit_weight_features",
]
