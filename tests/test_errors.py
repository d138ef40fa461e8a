"""Bad requests fail with a ValueError naming the problem, before any calibration runs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import statistics


@pytest.fixture
def model():
    return AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration must not run for an invalid request")

    monkeypatch.setattr(statistics, "run_calibration", refuse)


def test_unknown_family_lists_supported_ones():
    with pytest.raises(ValueError, match=r"Unknown MoE architecture 'llama'.*mixtral.*register_family"):
        AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("llama"))


def test_target_not_below_expert_count(model, no_calibration, sample_texts):
    with pytest.raises(ValueError, match="not below the 6 experts"):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=6), calibration=sample_texts)


def test_target_below_top_k(model, no_calibration, sample_texts):
    with pytest.raises(ValueError, match="below the router's top-k of 2"):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=1), calibration=sample_texts)


def test_lowering_top_k_allows_small_targets(model, tiny_tokenizer, sample_texts):
    model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=1, top_k=1),
                        calibration=sample_texts, tokenizer=tiny_tokenizer, seq_len=32)
    assert [layer.top_k for layer in model.moe_layers()] == [1, 1]
    assert model.config.num_experts_per_tok == 1
    model(torch.randint(4, 90, (1, 8)))


@pytest.mark.parametrize("calibration", [[], ["   ", ""], torch.empty(0, 16, dtype=torch.long)])
def test_empty_calibration_set(model, tiny_tokenizer, calibration):
    with pytest.raises(ValueError, match="empty"):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=calibration,
                            tokenizer=tiny_tokenizer)


def test_texts_without_tokenizer(model, sample_texts):
    with pytest.raises(ValueError, match="tokenizer"):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=sample_texts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_in_weights(model, no_calibration, sample_texts, bad):
    with torch.no_grad():
        model.model.model.layers[1].mlp.experts.down_proj[2, 0, -1] = bad
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj.*NaN"):
        model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=sample_texts)


def test_unknown_method(model):
    with pytest.raises(ValueError, match="Unknown method 'nope'.*frequency"):
        model.prune_experts(MoEPruneConfig(method="nope", experts_per_layer=3))


def test_invalid_config_values():
    with pytest.raises(ValueError, match="expert_sparsity"):
        MoEPruneConfig(method="frequency", expert_sparsity=1.5)
    with pytest.raises(ValueError, match="one expert target"):
        MoEPruneConfig(method="frequency", experts_per_layer=2, expert_sparsity=0.5)


def test_config_round_trip():
    config = MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.4, unstructured="owl",
                            nm_pattern=(2, 4), method_options={"linkage": "complete"})
    assert MoEPruneConfig.from_dict(config.to_dict()) == config
    assert MoEPruneConfig.from_dict({**config.to_dict(), "from_the_future": 1}) == config
