"""MC-SMoE's merging stage (M-SMoE): routing-guided grouping around dominant experts, frequency-weighted merge.

Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy" (ICLR 2024),
https://arxiv.org/abs/2310.01334. The compression stage (low-rank + sparse) is not part of this method.
The defaults follow the authors' Mixtral code (UNITES-Lab/MC-SMoE `mcsmoe/msmoe-merging-mixtral.py` l.39-48,
`mcsmoe/merging/grouping_mixtral.py`).
"""

from __future__ import annotations

from ..merging import ClusterMergeMethod
from ..registry import register_method


@register_method
class MCSMoE(ClusterMergeMethod):
    """Dominant experts by one global frequency threshold; every other expert joins its most similar dominant one.

    1. Frequency: each expert's share of its layer's routed tokens (`compute_all_usages`, l.193-219).
    2. Counts (`_assign_num_groups_per_layer`, l.91-135): over all layers, the experts whose share is strictly
       above the (budget + 1)-th largest are dominant, and each layer keeps as many experts as it has dominant
       ones, so counts differ between layers. A layer always keeps its router's top-k most used experts (the
       reference guarantees one; with fewer than top-k a folded router cannot serve the layer). Shares tied at
       the threshold are all left out, as in the reference, so the total can end a few experts under the
       budget; `exact_budget=True` fills it, ties taken in layer order.
    3. Grouping (`group_experts_globally_from_dominant_experts`, l.165-189): every other expert joins the
       dominant expert whose router-logit column is most similar (cosine over all calibration tokens, which
       orders pairs as the reference's (cos + 1) / 2).
    4. Merge (`merge_by_groups_with_usage_weighted`, l.302-333): weights proportional to routed tokens, with no
       permutation alignment (the Mixtral path has none; `permute_when_merge` defaults to False on Switch too).

    The reference's `num_average_groups=g` is `num_experts_total=g * layers` (or `expert_sparsity=1 - g / E`).
    `experts_per_layer` keeps that count in every layer, as does `uniform=True` with the other targets: prefer
    a uniform result for engines that need one count per layer (vLLM, llama.cpp) or for group-limited routing.
    `adaptive=True` with `experts_per_layer` uses the global rule with `experts_per_layer * layers` as budget.

    Where the default differs from the reference, by choice: the router is folded into one averaged row per
    merged expert (`router="folded"`; the reference ties all E rows to the merged expert, `router="tied"`),
    so the result is the family's own architecture; and the top-k floor above.

    Options: as for `uncurl` (see `hf_moeprune.methods.uncurl.Uncurl`), with defaults `clustering="dominant"`,
    `similarity="router-logits"`, `alignment="none"` (`"weights"`: align each group to its dominant expert
    first, our earlier default; prefer it: halving the 8-expert testbed did 0.33 of random removal's damage
    with it, 0.43 without), `merge_weights="frequency"`, `router_rows="weighted"`, and
        uniform (`bool`, default False): one count per layer, for every target.
        exact_budget (`bool`, default False): fill the budget exactly when shares tie at the threshold.

    Example:
        >>> model.merge_experts(MoEPruneConfig(method="mc-smoe", expert_sparsity=0.5), calibration=texts)
        >>> model.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=4), calibration=texts)  # uniform
    """

    name = "mc-smoe"
    pretty_name = "MC-SMoE merging (routing-guided dominant experts)"
    paper = "https://arxiv.org/abs/2310.01334"
    defaults = {
        **ClusterMergeMethod.defaults,
        "clustering": "dominant",
        "alignment": "none",
        "adaptive_by": "frequency",
    }

    @property
    def global_counts(self) -> bool:
        if self.options["uniform"]:
            return False
        return self.config.adaptive or self.config.experts_per_layer is None
