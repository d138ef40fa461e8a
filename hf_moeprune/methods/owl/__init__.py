"""OWL alone: Wanda scores with per-layer sparsity set by each layer's share of outlier scores.

Paper: https://arxiv.org/abs/2310.05175. r_l = share of scores above M * mean in decoder layer l (measured on
the unpruned model, layer by layer); ratios rescaled into [0, 2*lambda]; s_l = s - (r_l - mean(r)), averaging
to the target s (size-weighted when layers differ in size).

Options: `owl_m` (M, default 5), `owl_lambda` (default 0.08), `targets`, `sequential` (see `wanda`).

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
