"""Surgery on every family: removing experts the router never selects leaves the logits unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny_model, logits_of, make_unselectable
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from hf_moeprune import AutoMoEPruneModelForCausalLM, AutoMoEPruneModelForSeq2SeqLM, LayerPlan, ReductionPlan
from hf_moeprune.families import registered_families
from hf_moeprune.moe_layers import find_moe_layers
from hf_moeprune.surgery import apply_plan

REMOVED, KEPT = [1, 4], [0, 2, 3, 5]


def _wrapped(family: str, model):
    spec = registered_families()[family]
    auto = AutoMoEPruneModelForSeq2SeqLM if spec.task == "seq2seq-lm" else AutoMoEPruneModelForCausalLM
    return auto.from_model(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_unselectable_experts_keeps_logits(family, tmp_path):
    model = build_tiny_model(family)
    wrapped = _wrapped(family, model)
    layers = wrapped.moe_layers()
    input_ids = torch.randint(4, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    make_unselectable(model, layers, REMOVED, input_ids)
    before = logits_of(model, input_ids)

    wrapped.apply_plan(ReductionPlan({layer.path: LayerPlan.keep(KEPT) for layer in layers}))
    after = logits_of(model, input_ids)
    assert all(layer.num_experts == len(KEPT) for layer in find_moe_layers(model, wrapped.spec))
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)

    folder = wrapped.save_pretrained(tmp_path / "pruned")
    auto = AutoModelForSeq2SeqLM if wrapped.spec.task == "seq2seq-lm" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(folder).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), after, atol=1e-6, rtol=0)
    assert getattr(reloaded.config, wrapped.spec.num_experts_key) == len(KEPT)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "switch_transformers"])
def test_removing_selected_experts_changes_logits(family):
    """The control for the test above: the invariance is not vacuous."""
    model = build_tiny_model(family)
    layers = find_moe_layers(model, registered_families()[family])
    input_ids = torch.randint(4, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    before = logits_of(model, input_ids)
    apply_plan(layers, ReductionPlan({layer.path: LayerPlan.keep(KEPT) for layer in layers}))
    assert (logits_of(model, input_ids) - before).abs().max() > 1e-3


def test_merge_weights_average_expert_tensors_and_router_rows():
    model = build_tiny_model("mixtral")
    layer = find_moe_layers(model, registered_families()["mixtral"])[0]
    experts = {k: v.detach().clone() for k, v in layer.expert_tensors().items()}
    router = layer.router_tensors()["weight"].detach().clone()
    plan = LayerPlan(groups=[[0, 1], [2], [3], [4], [5]], weights=[[3.0, 1.0], [1], [1], [1], [1]])
    apply_plan([layer], ReductionPlan({layer.path: plan}))
    expected = 0.75 * experts["gate_up_proj"][0] + 0.25 * experts["gate_up_proj"][1]
    torch.testing.assert_close(layer.expert_tensors()["gate_up_proj"][0], expected)
    torch.testing.assert_close(layer.router_tensors()["weight"][0], 0.75 * router[0] + 0.25 * router[1])
    torch.testing.assert_close(layer.expert_tensors()["down_proj"][1], experts["down_proj"][2])
    assert layer.experts.num_experts == 5 and layer.router.num_experts == 5


def test_generic_fallback_recognises_an_unlisted_family(tmp_path):
    """granitemoe has no spec; the router + fused-experts pattern is inferred and pruning round-trips."""
    model = build_tiny_model("granitemoe")
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    assert wrapped.spec.name == "generic:granitemoe"
    layers = wrapped.moe_layers()
    assert [layer.path for layer in layers] == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
    input_ids = torch.randint(4, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    make_unselectable(model, layers, REMOVED, input_ids)
    before = logits_of(model, input_ids)
    wrapped.apply_plan(ReductionPlan({layer.path: LayerPlan.keep(KEPT) for layer in layers}))
    torch.testing.assert_close(logits_of(model, input_ids), before, atol=2e-5, rtol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(wrapped.save_pretrained(tmp_path / "g")).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), logits_of(model, input_ids), atol=1e-6, rtol=0)


def test_unweighted_merge_is_the_plain_average_of_members_and_router_rows():
    model = build_tiny_model("mixtral")
    layer = find_moe_layers(model, registered_families()["mixtral"])[0]
    experts = {k: v.detach().clone() for k, v in layer.expert_tensors().items()}
    router = layer.router_tensors()["weight"].detach().clone()
    apply_plan([layer], ReductionPlan({layer.path: LayerPlan(groups=[[0, 1, 3], [2], [4], [5]])}))
    for name, before in experts.items():
        torch.testing.assert_close(layer.expert_tensors()[name][0], before[[0, 1, 3]].mean(0))
        torch.testing.assert_close(layer.expert_tensors()[name][1:], before[[2, 4, 5]])
    torch.testing.assert_close(layer.router_tensors()["weight"][0], router[[0, 1, 3]].mean(0))


BAD_PLANS = [
    (LayerPlan(groups=[]), "the plan keeps no expert."),
    (LayerPlan(groups=[[0], [], [1]]), "the plan has an empty group."),
    (LayerPlan(groups=[[0], [6]]), "expert index 6 out of range (layer has 6)."),
    (LayerPlan(groups=[[-1], [0]]), "expert index -1 out of range (layer has 6)."),
    (LayerPlan(groups=[[0, 1], [1]]), "expert 1 appears in more than one group."),
    (LayerPlan(groups=[[0, 1], [2]], weights=[[1.0, 1.0]]), "the plan has 1 lists of merge weights for 2 groups."),
    (LayerPlan(groups=[[0, 1], [2]], weights=[[1.0], [1.0]]), "merge weights [1.0] do not fit group [0, 1]."),
    (LayerPlan(groups=[[0, 1], [2]], weights=[[0.0, 0.0], [1.0]]), "merge weights [0.0, 0.0] do not fit group [0, 1]."),
    (LayerPlan(groups=[[0, 1], [2]], tied_router=True), "a tied router maps every expert, but the plan leaves out [3, 4, 5]."),
    (LayerPlan(groups=[[0]]), "1 experts is below the router's top-k of 2; set MoEPruneConfig(top_k=...) to lower "
                              "top-k as well."),
]


@pytest.mark.parametrize(("bad", "message"), BAD_PLANS)
def test_a_bad_layer_plan_is_refused_by_name_before_any_layer_changes(bad, message):
    """The good plan of layer 0 is not applied either: `apply_plan` validates every layer first."""
    model = build_tiny_model("mixtral")
    layers = find_moe_layers(model, registered_families()["mixtral"])
    before = {name: t.detach().clone() for name, t in layers[0].expert_tensors().items()}
    plan = ReductionPlan({layers[0].path: LayerPlan.keep([0, 1, 2]), layers[1].path: bad})
    with pytest.raises(ValueError) as error:
        apply_plan(layers, plan)
    assert str(error.value) == f"{layers[1].path}: {message}"
    assert [layer.num_experts for layer in layers] == [6, 6]
    for name, tensor in layers[0].expert_tensors().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_plans_for_unknown_layers_or_untied_families_are_refused():
    model = build_tiny_model("mixtral")
    layers = find_moe_layers(model, registered_families()["mixtral"])
    with pytest.raises(ValueError, match=r"^The plan names layers the model does not have: \['model\.nope'\]\.$"):
        apply_plan(layers, ReductionPlan({"model.nope": LayerPlan.keep([0, 1])}))
    switch = build_tiny_model("switch_transformers")
    layer = find_moe_layers(switch, registered_families()["switch_transformers"])[0]
    tied = LayerPlan(groups=[[0, 1, 2], [3, 4, 5]], tied_router=True)
    with pytest.raises(ValueError, match="does not pass top-k indices to its experts, so a tied router cannot be "
                                         "mapped; use router='folded'"):
        apply_plan([layer], ReductionPlan({layer.path: tied}))


def test_a_plan_top_k_lets_a_layer_keep_fewer_experts_than_the_router_picked():
    model = build_tiny_model("mixtral")
    layers = find_moe_layers(model, registered_families()["mixtral"])
    apply_plan(layers, ReductionPlan({layer.path: LayerPlan.keep([4]) for layer in layers}, top_k=1))
    assert [(layer.num_experts, layer.top_k) for layer in layers] == [(1, 1), (1, 1)]
    assert logits_of(model, torch.randint(4, VOCAB, (1, 8))).isfinite().all()


def test_a_plan_of_only_merged_groups_averages_every_group():
    model = build_tiny_model("mixtral")
    layer = find_moe_layers(model, registered_families()["mixtral"])[0]
    experts = {k: v.detach().clone() for k, v in layer.expert_tensors().items()}
    groups = [[0, 1], [2, 3], [4, 5]]
    apply_plan([layer], ReductionPlan({layer.path: LayerPlan(groups=groups)}))
    for name, before in experts.items():
        torch.testing.assert_close(layer.expert_tensors()[name], torch.stack([before[g].mean(0) for g in groups]))
