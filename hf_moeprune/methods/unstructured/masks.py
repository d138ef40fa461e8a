"""Scores and masks of weight-level pruning: Wanda, OWL layer ratios, N:M patterns. Pure tensor code.

Wanda (Sun et al., https://arxiv.org/abs/2306.11695): score S_ij = |W_ij| * ||X_j||_2, where X_j is input
feature j over the calibration tokens; the lowest scores are zeroed within each output row.

OWL (Yin et al., https://arxiv.org/abs/2310.05175): the share r_l of "outlier" scores (S > M * mean(S)) in
layer l sets its sparsity: ratios are rescaled into [0, 2 * lambda] and s_l = s - (r_l - mean(r)), so layers
with many outliers are pruned less and the layers' sparsities average to the target s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor, in_axis: int) -> torch.Tensor:
    """|W| * ||X||, the norm broadcast along `in_axis` (float32).

    Args:
        weight: A weight matrix of any layout.
        input_norm: `||X_j||_2` per input feature, of length `weight.shape[in_axis]`.
        in_axis: Axis of `weight` indexing input features.
    """
    norm = input_norm.to(device=weight.device, dtype=torch.float32)
    if float(norm.abs().sum()) == 0.0:
        # no calibration token reached this weight (an expert never routed): fall back to magnitude
        norm = torch.ones_like(norm)
    shape = [1] * weight.dim()
    shape[in_axis] = -1
    return weight.detach().float().abs() * norm.view(shape)


def _rows(score: torch.Tensor, in_axis: int) -> torch.Tensor:
    """`score` as `[rows, in_features]`: every output row against its input features."""
    return score.movedim(in_axis, -1).reshape(-1, score.shape[in_axis])


def row_prune_mask(score: torch.Tensor, sparsity: float, in_axis: int) -> torch.Tensor:
    """Boolean mask (True = zero it) removing `round(in_features * sparsity)` lowest scores in every output row."""
    rows = _rows(score, in_axis)
    k = int(round(rows.shape[1] * sparsity))
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        index = torch.topk(rows, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, index, True)
    return _unrows(mask, score, in_axis)


def nm_prune_mask(score: torch.Tensor, n: int, m: int, in_axis: int) -> torch.Tensor:
    """Boolean mask keeping the `n` highest scores in every group of `m` consecutive input features.

    `(2, 4)` is the 2:4 pattern of sparse tensor cores: at most 2 non-zeros in every 4 weights.
    """
    rows = _rows(score, in_axis)
    if rows.shape[1] % m:
        raise ValueError(f"N:M pattern {n}:{m} needs input features divisible by {m}, got {rows.shape[1]}.")
    groups = rows.reshape(rows.shape[0], -1, m)
    index = torch.topk(groups, m - n, dim=-1, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, index, True)
    return _unrows(mask.reshape(rows.shape), score, in_axis)


def _unrows(mask: torch.Tensor, like: torch.Tensor, in_axis: int) -> torch.Tensor:
    moved_shape = like.movedim(in_axis, -1).shape
    return mask.reshape(moved_shape).movedim(-1, in_axis)


def outlier_counts(score: torch.Tensor, threshold: float) -> int:
    return int((score > threshold).sum())


def owl_layer_sparsities(
    outlier_ratios: Sequence[float],
    target: float,
    lam: float = 0.08,
    sizes: Sequence[float] | None = None,
    max_sparsity: float = 0.99,
) -> list[float]:
    """OWL's per-layer sparsities: `target - (scaled_l - mean(scaled))`, scaled_l the outlier shares mapped
    onto [0, 2 lam]; the plain mean without sizes is the authors' rule (luuyin/OWL `lib/prune_all.py`
    `prune_wanda_outlier`, STUN's copy `OWL/lib/prune_all.py` l.926-938), which never clamps.

    Args:
        outlier_ratios: Share of outlier scores per layer.
        target: Sparsity the layers average to.
        lam: The layers' sparsities spread over `[target - lam, target + lam]`.
        sizes: Parameters per layer. When given (option `owl_balance="size_weighted"`), the size-weighted
            mean is matched instead, so the total share of zeros equals `target` even when layers differ in
            size (non-uniform expert counts after STUN's first phase).
        max_sparsity: Upper clamp; with `sizes` the shift is re-solved after clamping so the average holds.
    """
    r = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    w = torch.ones_like(r) if sizes is None else torch.tensor(list(sizes), dtype=torch.float64)
    spread = r.max() - r.min() if r.numel() else torch.tensor(0.0)
    scaled = (r - r.min()) / spread * (2 * lam) if float(spread) > 0 else torch.zeros_like(r)
    base = target - (scaled - scaled.mean())
    if sizes is None:
        return base.clamp(0.0, max_sparsity).tolist()  # clamps only far outside the authors' range
    # solve for a shift c with weighted-mean(clamp(base + c)) == target (monotone in c: bisection)
    lo, hi = -1.0, 1.0
    for _ in range(60):
        c = (lo + hi) / 2
        mean = float((base + c).clamp(0.0, max_sparsity).mul(w).sum() / w.sum())
        lo, hi = (c, hi) if mean < target else (lo, c)
    return (base + (lo + hi) / 2).clamp(0.0, max_sparsity).tolist()
