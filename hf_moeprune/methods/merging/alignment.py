"""Permutation alignment of experts' hidden units, written once for every family from its `ExpertTensor` specs.

The hidden units (intermediate neurons) of an expert can be put in any order without changing what it computes,
as long as every tensor that indexes them is permuted the same way: gate rows, up rows, down columns and their
biases. Two experts trained apart (or from one upcycled dense layer and then drifting) hold corresponding units
at different positions, so averaging their weights position by position mixes unrelated units. Alignment finds,
for each member of a cluster, the unit order that best matches the cluster's anchor and applies it in place
before the merge (weight matching, Ainsworth et al. 2023, as used by MC-SMoE and UNCURL).

Cost of one pair: building the `[I, I]` score matrix is O(I^2 D) with D the features per unit (3H for SwiGLU);
at Mixtral size (I=14336, H=4096) that is 5 TFLOP, so above `SKETCH_AUTO_FLOPS` the unit features are first
compressed with a CountSketch (O(I D), inner products preserved in expectation), then scored in float32 row chunks.
The assignment is solved by `lap.lapjv` when the `lap` package is installed (several times faster than scipy on
near-permutation matrices) and by `scipy.optimize.linear_sum_assignment` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...families import ExpertTensor
from ...moe_layers import MoELayer

# Above this many multiply-adds for the exact score matrix, "auto" sketching switches on.
SKETCH_AUTO_FLOPS = 2.5e11
DEFAULT_SKETCH_DIM = 2048


def _unit_specs(layer: MoELayer) -> tuple[ExpertTensor, ...]:
    return tuple(t for t in layer.expert_tensor_specs() if t.unit_axis is not None)


def expert_parameter(layer: MoELayer, tensor: ExpertTensor, expert: int) -> torch.Tensor:
    """The storage of one expert's tensor, without its expert axis (a view: writing to it changes the model)."""
    if layer.spec.expert_layout == "fused":
        return getattr(layer.experts, tensor.name)[expert]
    return layer.expert_module(expert).get_parameter(tensor.name)


def _units_per_index(layout: str) -> int:
    return 2 if layout in ("chunk2", "interleave2") else 1


def num_units(layer: MoELayer) -> int:
    """Hidden units per expert, read off the first tensor that has a unit axis."""
    specs = _unit_specs(layer)
    if not specs:
        raise ValueError(
            f"{layer.path}: the family spec {layer.spec.name!r} names no tensor with a unit axis."
        )
    first = specs[0]
    return expert_parameter(layer, first, 0).shape[first.unit_axis] // _units_per_index(first.unit_layout)


def unit_index(perm: torch.Tensor, layout: str, units: int) -> torch.Tensor:
    """Positions along a tensor's unit axis that realise the unit permutation `perm` for a given layout."""
    if layout == "plain":
        return perm
    if layout == "chunk2":
        return torch.cat([perm, perm + units])
    if layout == "interleave2":
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    raise ValueError(f"Unknown unit layout {layout!r}.")


@torch.no_grad()
def permute_expert_units(layer: MoELayer, expert: int, perm: Sequence[int] | torch.Tensor) -> None:
    """Reorder expert `expert`'s hidden units in place so that new unit j is old unit `perm[j]`.

    Every tensor with a unit axis (gate/up rows, down columns, their biases) is permuted with the same
    `perm`, so the expert computes exactly the same function afterwards.
    """
    units = num_units(layer)
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (units,) or not torch.equal(perm.sort().values, torch.arange(units)):
        raise ValueError(f"{layer.path}: perm must be a permutation of {units} units.")
    for tensor in _unit_specs(layer):
        weight = expert_parameter(layer, tensor, expert)
        index = unit_index(perm.to(weight.device), tensor.unit_layout, units)
        weight.copy_(weight.index_select(tensor.unit_axis, index))


def _split_units(value: torch.Tensor, layout: str, units: int) -> torch.Tensor:
    """`[U, F]` rows along the unit axis -> `[units, k * F]`, the gate and up halves of a unit side by side."""
    if layout == "plain":
        return value
    if layout == "chunk2":
        return torch.cat([value[:units], value[units:]], dim=1)
    return value.reshape(units, 2 * value.shape[1])  # interleave2: rows 2u, 2u+1 belong to unit u


@torch.no_grad()
def unit_weight_features(layer: MoELayer, expert: int) -> torch.Tensor:
    """`[I, D]` float32: for every hidden unit, all its weights (gate row, up row, down column, biases) in a row."""
    units = num_units(layer)
    parts = []
    for tensor in _unit_specs(layer):
        value = expert_parameter(layer, tensor, expert).detach().float().movedim(tensor.unit_axis, 0)
        parts.append(_split_units(value.reshape(value.shape[0], -1), tensor.unit_layout, units))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def unit_activation_features(layer: MoELayer, expert: int, inputs: torch.Tensor) -> torch.Tensor:
    """`[I, k N]` float32: each hidden unit's pre-activations (gate and up) on `N` sampled layer inputs,
    centred and scaled per unit so that the score between two units is their correlation over the tokens."""
    units = num_units(layer)
    x = inputs.float()
    parts = []
    for tensor in _unit_specs(layer):
        if tensor.input_kind != "hidden" or tensor.in_axis is None:
            continue
        weight = expert_parameter(layer, tensor, expert).detach().float().movedim(tensor.unit_axis, 0)
        pre = weight.to(x.device) @ x.T  # [U, N]: the unit axis first, the input axis left over
        parts.append(_split_units(pre, tensor.unit_layout, units))
    if not parts:
        raise ValueError(
            f"{layer.path}: no tensor fed by the layer input has a unit axis; use alignment='weights'."
        )
    features = torch.cat(parts, dim=1)
    features = features - features.mean(1, keepdim=True)
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-8)


def count_sketch(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """CountSketch of the rows of `features` to `dim` columns: each input column is added, with a random sign,
    to one random output column. Inner products between rows are preserved in expectation; cost O(rows * D)."""
    generator = torch.Generator().manual_seed(seed)
    width = features.shape[1]
    bucket = torch.randint(0, dim, (width,), generator=generator)
    sign = torch.randint(0, 2, (width,), generator=generator).float().mul_(2).sub_(1)
    out = torch.zeros(features.shape[0], dim, dtype=torch.float32)
    out.index_add_(1, bucket, features * sign)
    return out


def alignment_score(
    anchor: torch.Tensor,
    member: torch.Tensor,
    *,
    sketch_dim: int | str | None = "auto",
    chunk_rows: int = 2048,
    seed: int = 0,
) -> np.ndarray:
    """`[I, I]` float32 score: entry (i, j) is the inner product of anchor unit i's and member unit j's features.

    Args:
        anchor, member: `[I, D]` unit features of the two experts.
        sketch_dim: Compress the features to this many columns with one shared CountSketch first. `"auto"`
            sketches to `DEFAULT_SKETCH_DIM` when the exact product would exceed `SKETCH_AUTO_FLOPS`; None never.
        chunk_rows: Rows of the score computed at a time (bounds the temporary memory).
    """
    units, width = anchor.shape
    if sketch_dim == "auto":
        sketch_dim = (
            DEFAULT_SKETCH_DIM
            if units * units * width > SKETCH_AUTO_FLOPS and width > DEFAULT_SKETCH_DIM
            else None
        )
    if sketch_dim is not None and int(sketch_dim) < width:
        anchor = count_sketch(anchor, int(sketch_dim), seed)
        member = count_sketch(member, int(sketch_dim), seed)
    score = np.empty((anchor.shape[0], member.shape[0]), dtype=np.float32)
    member_t = member.T.contiguous()
    for start in range(0, anchor.shape[0], chunk_rows):
        stop = min(start + chunk_rows, anchor.shape[0])
        score[start:stop] = (anchor[start:stop] @ member_t).numpy()
    return score


def solve_assignment(score: np.ndarray, solver: str = "auto") -> np.ndarray:
    """The permutation `perm` maximising `sum_i score[i, perm[i]]`.

    Args:
        solver: `"lapjv"` (the `lap` package), `"scipy"` (`linear_sum_assignment`), or `"auto"` (lapjv when
            installed, scipy otherwise).
    """
    if solver == "auto":
        try:
            import lap  # noqa: F401

            solver = "lapjv"
        except ImportError:
            solver = "scipy"
    if solver == "lapjv":
        import lap

        cost = score.max() - score.astype(np.float64)
        _, rows_to_cols, _ = lap.lapjv(cost, extend_cost=False)
        return np.asarray(rows_to_cols, dtype=np.int64)
    if solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        _, cols = linear_sum_assignment(score, maximize=True)
        return cols.astype(np.int64)
    raise ValueError(f"Unknown assignment solver {solver!r}: use 'auto', 'lapjv' or 'scipy'.")


@dataclass
class AlignmentReport:
    """What aligning one member to its anchor did: the score before (identity order) and after, and the time."""

    anchor: int
    member: int
    score_before: float
    score_after: float
    moved_units: int
    seconds: float


@torch.no_grad()
def align_groups(
    layer: MoELayer,
    groups: Sequence[Sequence[int]],
    *,
    mode: str = "weights",
    inputs: torch.Tensor | None = None,
    sketch_dim: int | str | None = "auto",
    solver: str = "auto",
    seed: int = 0,
) -> list[AlignmentReport]:
    """Permute every non-anchor member of each group (the anchor is the group's first index) to its anchor.

    Args:
        mode: `"weights"` (score = inner product of the units' concatenated weights) or `"activations"`
            (correlation of the units' gate/up pre-activations on `inputs`, sampled layer inputs `[N, H]`).
    """
    if mode not in ("weights", "activations"):
        raise ValueError(f"Unknown alignment {mode!r}: use 'weights', 'activations' or 'none'.")
    if mode == "activations" and (inputs is None or inputs.numel() == 0):
        raise ValueError(f"{layer.path}: alignment='activations' needs sampled layer inputs.")

    def features(expert: int) -> torch.Tensor:
        if mode == "weights":
            return unit_weight_features(layer, expert)
        return unit_activation_features(layer, expert, inputs)

    reports = []
    for group in groups:
        if len(group) < 2:
            continue
        anchor_features = features(group[0])
        for member in group[1:]:
            start = time.perf_counter()
            score = alignment_score(anchor_features, features(member), sketch_dim=sketch_dim, seed=seed)
            perm = solve_assignment(score, solver)
            permute_expert_units(layer, member, torch.from_numpy(perm))
            diagonal = float(np.trace(score))
            after = float(score[np.arange(len(perm)), perm].sum())
            reports.append(
                AlignmentReport(
                    anchor=int(group[0]),
                    member=int(member),
                    score_before=diagonal,
                    score_after=after,
                    moved_units=int((perm != np.arange(len(perm))).sum()),
                    seconds=time.perf_counter() - start,
                )
            )
    return reports
