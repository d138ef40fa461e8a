"""Merges with a tied router: all E router rows kept and mapped onto the merged experts, so routing is unchanged;
the map is saved in the record and honoured by hf_moeprune's Auto classes and by the saved remote code."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, logits_of
from transformers import AutoModelForCausalLM

from hf_moeprune import AutoMoEPruneModelForCausalLM, LayerPlan, MoEPruneConfig, ReductionPlan

IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(2))
# Arctic is hf_moeprune's own class (no remote code); Switch passes a one-hot mask, not indices, to its experts.
TIED_FAMILIES = [family for family in FAMILIES if family not in ("arctic", "switch_transformers")]


def _duplicate(model, pairs: list[tuple[int, int]]) -> None:
    """Make expert b (weights and router row) a copy of expert a: merging them must not change the model."""
    for layer in model.moe_layers():
        tensors = {name: value.detach().clone() for name, value in layer.expert_tensors().items()}
        router = {name: value.detach().clone() for name, value in layer.router_tensors().items()}
        for a, b in pairs:
            for value in (*tensors.values(), *router.values()):
                value[b] = value[a]
        layer.set_expert_tensors(tensors)
        layer.set_router_tensors(router)


def _tied_plan(model, groups: list[list[int]]) -> ReductionPlan:
    return ReductionPlan(
        layers={layer.path: LayerPlan(groups=groups, tied_router=True) for layer in model.moe_layers()}
    )


@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_tied_merge_of_copies_keeps_logits_and_reloads(family, tmp_path):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model(family))
    _duplicate(model, [(0, 1), (2, 3)])  # copies tie in top-k, so tokens pick both: their weights must add up
    before = logits_of(model.model, IDS)
    num = model.moe_layers()[0].num_experts
    model.apply_plan(_tied_plan(model, [[0, 1], [2, 3], *([e] for e in range(4, num))]))
    assert [layer.num_experts for layer in model.moe_layers()] == [num - 2] * len(model.moe_layers())
    after = logits_of(model.model, IDS)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "out")
    ours = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(remote).__name__ == "MoEPrunedForCausalLM"
    torch.testing.assert_close(logits_of(ours.model, IDS), after, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(remote, IDS), after, rtol=0, atol=0)
    assert [layer.expert_map for layer in ours.moe_layers()][0] == [0, 0, 1, 1, *range(2, num - 2)]


def test_folded_merge_of_copies_changes_routing():
    """The contrast that makes the test above mean something: folding the rows changes the logits."""
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    _duplicate(model, [(0, 1), (2, 3)])
    before = logits_of(model.model, IDS)
    model.apply_plan(ReductionPlan(layers={
        layer.path: LayerPlan(groups=[[0, 1], [2, 3], [4], [5]]) for layer in model.moe_layers()
    }))
    assert (logits_of(model.model, IDS) - before).abs().max() > 1e-3


def test_merge_method_with_tied_router_records_the_map(tmp_path):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    model.merge_experts(
        MoEPruneConfig(method="uncurl", experts_per_layer=3, method_options={"router": "tied"}), calibration=CALIB
    )
    logits = logits_of(model.model, IDS)
    assert torch.isfinite(logits).all()
    for layer, entry in zip(model.moe_layers(), model.record["layers"].values(), strict=True):
        assert entry["router_rows"] == 6 and entry["num_experts"] == 3
        assert layer.num_router_rows == 6
        assert sorted(e for group in entry["groups"] for e in group) == list(range(6))
        assert layer.expert_map == [next(j for j, g in enumerate(entry["groups"]) if e in g) for e in range(6)]
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits_of(reloaded.model, IDS), logits, rtol=0, atol=0)


def test_tied_router_refuses_plans_that_drop_experts():
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    with pytest.raises(ValueError, match=r"leaves out \[5\]"):
        model.apply_plan(_tied_plan(model, [[0, 1], [2, 3], [4]]))


@pytest.mark.parametrize("config", [
    MoEPruneConfig(method="frequency", experts_per_layer=2), MoEPruneConfig(method="wanda", weight_sparsity=0.5),
])
def test_tied_layer_is_not_reduced_again(config):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    model.apply_plan(_tied_plan(model, [[0, 1], [2, 3], [4], [5]]))
    with pytest.raises(ValueError, match=r"'router': 'folded'"):
        model.prune_experts(config, calibration=None)  # refused before calibration


def test_tied_router_needs_top_k_indices():
    from hf_moeprune import AutoMoEPruneModelForSeq2SeqLM

    model = AutoMoEPruneModelForSeq2SeqLM.from_model(build_tiny_model("switch_transformers"))
    with pytest.raises(ValueError, match=r"does not pass top-k indices"):
        model.apply_plan(_tied_plan(model, [[0, 1], [2, 3], [4], [5]]))
