"""Similarity between the experts of one layer, from calibration statistics (never from stored logits).

- `"router-logits"`: cosine between experts' router-logit columns over the calibration tokens (UNCURL, MC-SMoE;
  MC-SMoE rescales to (cos + 1) / 2, which orders pairs identically). From the streamed `[E, E]` Gram matrix.
- `"router-correlation"`: Pearson correlation of the same columns (the Gram matrix centred by the logit sums).
- `"expert-output"`: cosine between experts' mean outputs (HC-SMoE's features): over all calibration tokens
  when `outputs` (`outputs.mean_expert_outputs`) is given, as HC-SMoE's code, else over each expert's routed
  tokens (from the statistics).
"""

from __future__ import annotations

import torch

from ...calibration import LayerStatistics

SIMILARITIES = ("router-logits", "router-correlation", "expert-output")


def expert_similarity(stats: LayerStatistics, kind: str, outputs: torch.Tensor | None = None) -> torch.Tensor:
    """`[E, E]` float64 similarity in [-1, 1] with a unit diagonal."""
    if kind == "router-logits":
        similarity = stats.router_logit_similarity("cosine")
    elif kind == "router-correlation":
        similarity = stats.router_logit_similarity("correlation")
    elif kind == "expert-output":
        features = _mean_outputs(stats, outputs)
        features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
        similarity = features @ features.T
    else:
        raise ValueError(f"Unknown similarity {kind!r}: use one of {', '.join(SIMILARITIES)}.")
    similarity = similarity.clamp(-1.0, 1.0)
    similarity.fill_diagonal_(1.0)
    return similarity


def expert_features(stats: LayerStatistics, kind: str, outputs: torch.Tensor | None = None) -> torch.Tensor:
    """`[E, F]` vectors describing each expert, for k-means and Euclidean agglomerative clustering.

    Router similarities give each expert's logit profile over the sampled calibration tokens (standardised per
    expert for `"router-correlation"`); `"expert-output"` gives the mean expert outputs (HC-SMoE).
    """
    if kind == "expert-output":
        return _mean_outputs(stats, outputs).float()
    if kind not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {kind!r}: use one of {', '.join(SIMILARITIES)}.")
    profile = stats.logit_sample.T.float()  # [E, n]
    if profile.shape[1] == 0:
        raise ValueError("No router logits were sampled during calibration.")
    if kind == "router-correlation":
        profile = profile - profile.mean(1, keepdim=True)
        profile = profile / profile.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return profile


def _mean_outputs(stats: LayerStatistics, outputs: torch.Tensor | None) -> torch.Tensor:
    """The all-token mean outputs when computed, else the routed-token means of the statistics."""
    return outputs.double() if outputs is not None else stats.mean_output()
