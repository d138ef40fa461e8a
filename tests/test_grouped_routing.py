"""DeepSeek-style group-limited routing: plans keep every expert in its own group, equal groups, or are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, LayerPlan, ReductionPlan

# 8 experts in 2 groups of 4: group 0 = experts 0-3, group 1 = experts 4-7; each token picks 1 group.
GROUPED = dict(n_routed_experts=8, n_group=2, topk_group=1)


@pytest.fixture
def model():
    return AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("deepseek_v3", **GROUPED))


def _plan(model, groups: list[list[int]]) -> ReductionPlan:
    return ReductionPlan(layers={layer.path: LayerPlan(groups=[list(g) for g in groups]) for layer in model.moe_layers()})


def _silence(model, experts: list[int]) -> None:
    """Make `experts` unselectable: a correction bias far below every score keeps them out of each top-k."""
    for layer in model.moe_layers():
        layer.router.e_score_correction_bias[experts] = -1e4


def test_balanced_removal_of_unselectable_experts_keeps_logits(model):
    _silence(model, [3, 7])  # one expert per group
    ids = torch.randint(3, 90, (2, 12))
    before = model(ids).logits
    model.apply_plan(_plan(model, [[0], [1], [2], [4], [5], [6]]))
    assert [layer.num_experts for layer in model.moe_layers()] == [6, 6]
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)


def test_uneven_removal_is_refused_naming_the_groups(model):
    _silence(model, [2, 3])  # both in group 0: removing them would shift experts 4 and 5 into group 0
    with pytest.raises(ValueError, match=r"group 0: 2, group 1: 4"):
        model.apply_plan(_plan(model, [[0], [1], [4], [5], [6], [7]]))
    assert [layer.num_experts for layer in model.moe_layers()] == [8, 8]


def test_merge_across_groups_is_refused(model):
    with pytest.raises(ValueError, match=r"span several expert groups"):
        model.apply_plan(_plan(model, [[0, 4], [1], [2], [3], [5], [6], [7]]))


def test_reordering_across_groups_is_refused(model):
    with pytest.raises(ValueError, match=r"group order"):
        model.apply_plan(_plan(model, [[4], [5], [0], [1]]))


def test_merges_inside_groups_are_accepted(model):
    model.apply_plan(_plan(model, [[0, 1], [2, 3], [4, 5], [6, 7]]))
    assert [layer.num_experts for layer in model.moe_layers()] == [4, 4]
    assert torch.isfinite(model(torch.randint(3, 90, (1, 8))).logits).all()


def test_group_needs_two_experts(model):
    with pytest.raises(ValueError, match=r"at least 2 experts per group"):
        model.apply_plan(_plan(model, [[0], [4]]))
