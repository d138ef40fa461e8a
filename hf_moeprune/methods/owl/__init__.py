"""OWL alone: Wanda scores with per-layer sparsity set by each layer's share of outlier scores.

Paper: https://arxiv.org/abs/2310.05175, code luuyin/OWL (`lib/prune_all.py` `prune_wanda_outlier`, l.853-968). r_l = share of
scores above M * mean in decoder layer l (measured on the unpruned model, layer by layer); ratios rescaled
into [0, 2*lambda]; s_l = s - (r_l - mean(r)), whose plain mean is the target s, as in the code.

Options: `owl_m` (M, default 3: the code's default; its README commands use 5), `owl_lambda` (default 0.08),
`owl_balance` (`"mean"`, the code's, or `"size_weighted"`: the share of zeros over all pruned weights hits
the target; prefer it when layers differ in size, e.g. after STUN), `targets`, `sequential` (see `wanda`).
The code scores every `nn.Linear` of a decoder layer (attention and, in STUN's copy, the router too); the
default here is the experts only, `targets="all_linear"` is the code's scope (STUN's phase 2 default).

Example:
    >>> model.prune_experts(MoEPruneConfig(method="owl", weight_sparsity=0.5), calibration=texts)
"""

from __future__ import annotations

from ..registry import register_method
from ..wanda import OWLOptions, UnstructuredMethod


@register_method
class OWL(UnstructuredMethod):
    name = "owl"
    pretty_name = "OWL (outlier-weighted layer-wise sparsity)"
    paper = "https://arxiv.org/abs/2310.05175"
    algorithm = "owl"
    Options = OWLOptions
