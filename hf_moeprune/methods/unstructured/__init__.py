"""Weight-level pruning shared by `wanda`, `owl` and STUN's second phase (not a registered method).

`unstructured_prune_` / `wanda_prune_` / `owl_prune_` work on any transformers causal LM, MoE or dense.
"""

from .masks import nm_prune_mask, owl_layer_sparsities, row_prune_mask, wanda_scores
from .prune import (
    TARGET_KINDS,
    UnstructuredOptions,
    UnstructuredReport,
    WeightPruning,
    options_from_config,
    owl_prune_,
    unstructured_prune_,
    wanda_prune_,
)

__all__ = [
    "TARGET_KINDS",
    "UnstructuredOptions",
    "UnstructuredReport",
    "WeightPruning",
    "nm_prune_mask",
    "options_from_config",
    "owl_layer_sparsities",
    "owl_prune_",
    "row_prune_mask",
    "unstructured_prune_",
    "wanda_prune_",
    "wanda_scores",
]
