"""DeepSeek-style group-limited routing: plans keep every expert in its own group, equal groups, or are refused;
the methods budget per group (or refuse before any calibration)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, LayerPlan, MoEPruneConfig, ReductionPlan
from hf_moeprune.methods import get_method
from hf_moeprune.methods.targets import expert_groups, keep_per_group

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


# --- methods budget per group ---------------------------------------------------------------------------------

CALIB = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
GROUP_AWARE = ["frequency", "random", "reap", "naee", "stun", "uncurl", "mc-smoe", "hc-smoe"]


def _reduce(model, config: MoEPruneConfig):
    if get_method(config.method).kind == "merge":
        return model.merge_experts(config, calibration=CALIB)
    return model.prune_experts(config, calibration=CALIB)


def test_keep_per_group_takes_the_best_of_each_group(model):
    layer = model.moe_layers()[0]
    assert keep_per_group(layer, [7, 6, 5, 4, 0, 3, 1, 2], 4) == [0, 3, 6, 7]  # a global top-4 would be 4-7
    assert expert_groups(layer) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("method", GROUP_AWARE)
def test_group_aware_methods_keep_equal_groups_and_reload(model, method, tmp_path):
    _silence(model, [4, 5, 6])  # group 1 is never chosen: a global ranking would drop all of it
    _reduce(model, MoEPruneConfig(method=method, experts_per_layer=4))
    for path, entry in model.record["layers"].items():
        owners = [sorted({index // 4 for index in group}) for group in entry["groups"]]
        assert owners == [[0], [0], [1], [1]], (path, entry["groups"])
    ids = torch.randint(3, 90, (2, 12))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out")
    assert [layer.num_experts for layer in reloaded.moe_layers()] == [4, 4]
    torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("count, message", [(5, r"multiple of 2 experts"), (2, r"at least 4")])
def test_counts_that_cannot_split_evenly_are_refused(model, count, message):
    with pytest.raises(ValueError, match=message):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=count), calibration=None)


@pytest.mark.parametrize("method", ["frequency", "mc-smoe"])
def test_non_uniform_counts_are_refused_naming_the_groups(model, method):
    with pytest.raises(ValueError, match=r"\(model\.layers\.1\.mlp, n_group=2: experts 0-3, 4-7\); use uniform counts"):
        _reduce(model, MoEPruneConfig(method=method, expert_sparsity=0.5, adaptive=True))


def test_stun_top_k_cap_is_shared_by_the_groups_rounding_down(model):
    """The reference's `--top_k` merges per layer are split equally by the routing groups: 3 merges over 2 groups
    allow 1 per group (not 1.5), so 6 experts per layer is the fewest STUN can reach and 4 is refused."""
    options = {"top_k": 3}
    total = 6 * len(model.moe_layers())
    with pytest.raises(ValueError, match="cannot reach exactly"):
        _reduce(model, MoEPruneConfig(method="stun", num_experts_total=4 * len(model.moe_layers()),
                                      method_options=options))
    _reduce(model, MoEPruneConfig(method="stun", num_experts_total=total, method_options=options))
    for entry in model.record["layers"].values():
        assert [sorted({index // 4 for index in group}) for group in entry["groups"]] == [[0]] * 3 + [[1]] * 3


def test_naee_refusal_names_the_per_group_search(model):
    with pytest.raises(ValueError, match=r"NAEE would try C\(4, 2\)\^2 = 36 expert subsets"):
        model.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=4, method_options={"max_subsets": 35}),
                            calibration=None)


@pytest.mark.parametrize(("groups", "top_k", "config_top_k", "fewest"), [
    (1, 2, None, 2), (1, 2, 1, 1), (2, 2, None, 4), (2, 5, None, 6), (2, 6, None, 6), (4, 2, None, 8), (2, 5, 3, 4),
])
def test_fewest_experts_is_the_top_k_and_two_per_routing_group(groups, top_k, config_top_k, fewest):
    """Each routing group is scored by its top-2 experts and must hold its share of the top-k, rounded up."""
    from types import SimpleNamespace

    from hf_moeprune.methods.targets import fewest_experts

    layer = SimpleNamespace(num_expert_groups=groups, top_k=top_k)
    assert fewest_experts(layer, SimpleNamespace(top_k=config_top_k)) == fewest


def test_a_total_below_the_group_floors_is_refused_with_the_floor(model):
    with pytest.raises(ValueError) as raised:
        model.prune_experts(MoEPruneConfig(method="stun", num_experts_total=6), calibration=None)
    assert str(raised.value) == (
        "Target of 6 experts in total cannot give every layer its top-k and 2 experts per routing group (8 needed); "
        "lower top-k with MoEPruneConfig(top_k=...) or keep more experts."
    )
    assert [layer.num_experts for layer in model.moe_layers()] == [8, 8]


@pytest.mark.parametrize(("groups", "message"), [
    ([[0, 4], [1], [2], [3], [5], [6], [7]], "merged experts [[0, 4]] span several expert groups (n_group=2, 4 experts "
                                             "each); merge only within a group."),
    ([[4], [5], [0], [1]], "the plan reorders experts across groups (n_group=2); list new experts in group order."),
    ([[0], [1], [4], [5], [6], [7]], "group-limited routing (n_group=2) needs the same number of experts in every "
                                     "group, the plan keeps group 0: 2, group 1: 4; keep a multiple of 2 experts "
                                     "spread evenly over the groups."),
    ([[0, 1, 2, 3], [4, 5, 6, 7]], "group-limited routing scores each group by its top-2 experts; keep at least 2 "
                                   "experts per group (4 in this layer)."),
])
def test_group_limited_plan_refusals_name_the_layer_and_the_groups(model, groups, message):
    with pytest.raises(ValueError) as raised:
        model.apply_plan(_plan(model, groups))
    assert str(raised.value) == f"model.layers.1.mlp: {message}"
    assert [layer.num_experts for layer in model.moe_layers()] == [8, 8]
