"""HC-SMoE: hierarchical clustering of experts by their outputs, frequency-weighted merge.

Chen et al., "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (2024),
https://arxiv.org/abs/2410.08589.
"""

from __future__ import annotations

from ..merging import ClusterMergeMethod
from ..registry import register_method


@register_method
class HCSMoE(ClusterMergeMethod):
    """Per MoE layer, each expert is described by its mean output on the calibration tokens routed to it;
    agglomerative clustering (average linkage, Euclidean distance) forms the target number of groups, and each
    group is merged with weights proportional to routed-token frequency. HC-SMoE merges without permutation
    alignment, so `alignment="none"` is the default here; set `alignment="weights"` to add it.

    Options: as for `uncurl` (see `hf_moeprune.methods.uncurl.Uncurl`), with defaults
    `similarity="expert-output"`, `clustering="agglomerative"`, `cluster_on="features"`, `linkage="average"`,
    `alignment="none"`, `merge_weights="frequency"`, `router_rows="weighted"`.

    Example:
        >>> model.merge_experts(MoEPruneConfig(method="hc-smoe", experts_per_layer=4), calibration=texts)
    """

    name = "hc-smoe"
    pretty_name = "HC-SMoE (hierarchical clustering of expert outputs)"
    paper = "https://arxiv.org/abs/2410.08589"
    defaults = {
        **ClusterMergeMethod.defaults,
        "similarity": "expert-output",
        "clustering": "agglomerative",
        "cluster_on": "features",
        "alignment": "none",
    }
