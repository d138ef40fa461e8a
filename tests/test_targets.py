"""Expert targets turned into per-layer counts, and the refusals that come before any calibration."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))


def _model(top_k: int = 2) -> AutoMoEPruneModelForCausalLM:
    """Tiny Mixtral: 2 MoE layers of 6 experts."""
    return AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", num_experts_per_tok=top_k))


def _refusal(config: MoEPruneConfig, top_k: int = 2) -> str:
    model = _model(top_k)
    with pytest.raises(ValueError) as raised:
        model.prune_experts(config, calibration=CALIB)
    assert [layer.num_experts for layer in model.moe_layers()] == [6, 6]
    return str(raised.value)


def test_targets_that_remove_nothing_or_too_much_are_refused_by_name():
    assert _refusal(MoEPruneConfig(method="frequency", experts_per_layer=6)) == (
        "Target of 6 experts is not below the 6 experts of model.layers.0.mlp; nothing would be removed."
    )
    assert _refusal(MoEPruneConfig(method="frequency", experts_per_layer=1)) == (
        "Target of 1 experts is below the router's top-k of 2 in model.layers.0.mlp; "
        "pass MoEPruneConfig(top_k=...) to lower top-k as well."
    )
    assert _refusal(MoEPruneConfig(method="frequency", experts_per_layer=4, top_k=3)) == (
        "top_k=3 is above the model's top-k of 2; it can only be lowered."
    )
    assert _refusal(MoEPruneConfig(method="stun", num_experts_total=12)) == (
        "Target of 12 experts in total is not below the model's 12 experts."
    )
    assert _refusal(MoEPruneConfig(method="stun", num_experts_total=3)) == (
        "Target of 3 experts in total cannot give every layer its top-k (4 needed); "
        "lower top-k with MoEPruneConfig(top_k=...) or keep more experts."
    )


def test_a_layer_may_keep_exactly_its_top_k_or_the_model_top_k(caplog):
    for top_k, config_top_k in ((1, None), (2, 1)):  # the router's top-k, or a lowered one
        model = _model(top_k=top_k)
        config = MoEPruneConfig(method="frequency", experts_per_layer=1, top_k=config_top_k)
        with caplog.at_level("WARNING", logger="hf_moeprune"):
            model.prune_experts(config, calibration=CALIB)
        assert [(layer.num_experts, layer.top_k) for layer in model.moe_layers()] == [(1, 1), (1, 1)]
        assert (
            "2 layer(s) keep exactly their top-k experts, so their router no longer chooses which experts run "
            "(every token uses all of them): model.layers.0.mlp, model.layers.1.mlp. Keep more experts, or lower "
            "top-k with MoEPruneConfig(top_k=...), if the router should still choose."
        ) in caplog.messages
        caplog.clear()
    model = _model(top_k=2)
    model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3, top_k=2), calibration=CALIB)
    assert [(layer.num_experts, layer.top_k) for layer in model.moe_layers()] == [(3, 2), (3, 2)]


def test_adaptive_experts_per_layer_is_a_total_spread_over_the_layers():
    model = _model()
    model.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=4, adaptive=True), calibration=CALIB)
    counts = [layer.num_experts for layer in model.moe_layers()]
    assert sum(counts) == 8 and min(counts) >= 2
