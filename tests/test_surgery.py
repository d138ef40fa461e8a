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
