"""MC-SMoE's merging stage (M-SMoE): routing-guided grouping around dominant experts, aligned weighted merge.

Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy" (ICLR 2024),
https://arxiv.org/abs/2310.01334. The compression stage (low-rank + sparse) is not part of this method.
"""

from __future__ import annotations

from ..merging import ClusterMergeMethod
from ..registry import register_method


@register_method
class MCSMoE(ClusterMergeMethod):
    """Per MoE layer, the most frequently routed experts are dominant; every other expert joins the dominant
    expert whose router-logit column is most similar (cosine, which orders pairs as MC-SMoE's (cos + 1) / 2
    does); each group is permutation-aligned to its dominant expert (weight matching) and merged with weights
    proportional to routed-token frequency.

    With `MoEPruneConfig(adaptive=True)` the dominant experts are chosen by one global frequency ranking
    (each expert's share of its layer's tokens), as in the paper, so layers keep different counts.

    Options: as for `uncurl` (see `hf_moeprune.methods.uncurl.Uncurl`), with defaults `clustering="dominant"`,
    `similarity="router-logits"`, `alignment="weights"`, `merge_weights="frequency"`,
    `router_rows="weighted"`, `adaptive_by="frequency"`.

    Example:
        >>> model.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=4), calibration=texts)
    """

    name = "mc-smoe"
    pretty_name = "MC-SMoE merging (routing-guided dominant experts)"
    paper = "https://arxiv.org/abs/2310.01334"
    defaults = {**ClusterMergeMethod.defaults, "clustering": "dominant", "adaptive_by": "frequency"}
