"""Expert-pruning baselines under the same API: NAEE (planted redundancy, refusal), REAP (saliency, super experts)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.reap import REAPOptions, reap_scores, super_experts

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _with_duplicate(top_k: int = 1):
    """Expert 3 is a copy of expert 0 (router row and weights): top-1 routing never needs both."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", num_experts_per_tok=top_k))
    for layer in wrapped.moe_layers():
        layer.router_tensors()["weight"][3] = layer.router_tensors()["weight"][0]
        for tensor in layer.expert_tensors().values():
            tensor[3] = tensor[0]
    return wrapped


def test_naee_finds_the_redundant_expert():
    wrapped = _with_duplicate()
    before = logits_of(wrapped.model, IDS)
    wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=5), calibration=CALIB, batch_size=2)
    for entry in wrapped.record["layers"].values():
        kept = {g[0] for g in entry["groups"]}
        assert {1, 2, 4, 5} <= kept and len(kept & {0, 3}) == 1
    step = wrapped.record["steps"][-1]
    assert all(err < 1e-5 for err in step["details"]["relative_error"].values())
    assert step["details"]["block_evaluations"] == 2 * 6 and step["forward_passes"] == 2
    torch.testing.assert_close(logits_of(wrapped.model, IDS), before, atol=1e-4, rtol=1e-4)


def test_naee_refuses_huge_searches_before_calibration():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(
        build_tiny_model("mixtral", num_local_experts=32, hidden_size=32)
    )
    with pytest.raises(ValueError, match=r"C\(32, 16\) = 601,080,390 expert subsets.*stun"):
        wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=16), calibration=None)


def test_reap_drops_a_silent_expert_and_protects_super_experts():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    with torch.no_grad():
        for layer in wrapped.moe_layers():
            layer.expert_tensors()["down_proj"][2].zero_()  # its output is always zero: saliency 0
    options = {"protect_super_experts": True}  # off by default, as in the authors' code
    wrapped.prune_experts(MoEPruneConfig(method="reap", experts_per_layer=5, method_options=options), calibration=CALIB)
    details = wrapped.record["steps"][-1]["details"]
    for path, entry in wrapped.record["layers"].items():
        assert 2 not in {g[0] for g in entry["groups"]}
        assert details["scores"][path][2] == 0.0
        assert set(details["super_experts"][path]) <= {g[0] for g in entry["groups"]}


def _reap_protected(peaks: dict[int, float], **options) -> tuple[list[list[int]], dict]:
    """REAP with super-expert protection on a gpt_oss model whose expert e of layer l (keys l * 10 + e) has
    one output channel biased to the given value: a planted peak (positive) or a negative outlier."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("gpt_oss"))
    layers = wrapped.moe_layers()
    with torch.no_grad():
        for key, value in peaks.items():
            layers[key // 10].expert_tensors()["down_proj_bias"][key % 10, 0] = value
    config = MoEPruneConfig(method="reap", experts_per_layer=2,
                            method_options={"protect_super_experts": True, **options})
    wrapped.prune_experts(config, calibration=CALIB)
    details = wrapped.record["steps"][-1]["details"]
    return [details["super_experts"][layer.path] for layer in layers], details


def test_reap_super_expert_options_reach_the_detection():
    """The authors' defaults look at signed peaks in the first 75% of layers (layer 0 of 2); `super_expert_peak
    ="abs"` also catches negative outliers and `super_expert_layers="all"` the last layer. With 12 experts the
    99.5th percentile lies between the two largest peaks, so only the largest counts."""
    assert _reap_protected({1: 500.0, 3: -800.0})[0] == [[1], []]
    assert _reap_protected({1: 500.0, 3: -800.0}, super_expert_peak="abs")[0] == [[3], []]
    assert _reap_protected({14: 900.0, 1: 100.0})[0] == [[], []]
    assert _reap_protected({14: 900.0, 1: 100.0}, super_expert_layers="all")[0] == [[], [4]]


def test_reap_reports_more_super_experts_than_places():
    median = {"super_expert_quantile": 0.5}  # every planted peak is then above the threshold (max / 10)
    found, details = _reap_protected({0: 500.0, 2: 600.0, 4: 700.0}, **median)
    assert found == [[0, 2, 4], []] and details["super_expert_overflow"] == ["model.layers.0.mlp"]
    found, details = _reap_protected({0: 500.0, 2: 600.0}, **median)
    assert found == [[0, 2], []] and "super_expert_overflow" not in details


@pytest.mark.parametrize("name", ["super_expert_quantile", "super_expert_fraction"])
def test_reap_threshold_options_accept_the_closed_unit_interval(name):
    assert getattr(REAPOptions(**{name: 0.0}), name) == 0.0 and getattr(REAPOptions(**{name: 1.0}), name) == 1.0
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match=rf"option '{name}' of method 'reap' must be in \[0, 1\], got {bad}"):
            REAPOptions(**{name: bad})


def test_reap_splits_a_total_budget_evenly():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    wrapped.prune_experts(MoEPruneConfig(method="reap", num_experts_total=8), calibration=CALIB)
    assert [layer.num_experts for layer in wrapped.moe_layers()] == [4, 4]


def test_random_pruning_is_the_seeded_permutation_drawn_in_layer_order():
    """The reference rule: one generator seeded by the config, a permutation per layer in layer order, the first
    `count` of it kept; the same seed keeps the same experts and another seed others."""
    def kept(seed: int) -> list[list[int]]:
        wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
        wrapped.prune_experts(MoEPruneConfig(method="random", experts_per_layer=3, seed=seed))
        return [sorted(g[0] for g in entry["groups"]) for entry in wrapped.record["layers"].values()]

    generator = torch.Generator().manual_seed(5)
    seeded = kept(5)
    assert seeded == [sorted(torch.randperm(6, generator=generator)[:3].tolist()) for _ in range(2)]
    assert seeded != kept(6)


def test_reap_scoring_functions():
    scores = reap_scores(torch.tensor([4.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 3.0]))
    assert scores.tolist() == [2.0, 0.0, 1.0]
    found = super_experts({"a": torch.tensor([1.0, 1.2, 50.0]), "b": torch.ones(200)})
    assert found == {"a": [2], "b": []}


def test_super_experts_follow_the_reference_thresholds_and_layer_window():
    """CerebrasResearch/reap `get_super_expert_indices`: peaks strictly above max(99.5th percentile, max / 10),
    only in the first int(0.75 * L) layers unless every layer is asked for."""
    peaks = {f"layer{i}": torch.full((1000,), 0.5) for i in range(4)}  # the 99.5th percentile is 0.5
    peaks["layer0"][7] = 10.0
    peaks["layer1"][3] = 1.0  # exactly max / 10: not above it
    peaks["layer1"][4] = 1.5
    peaks["layer3"][5] = 6.0  # the last layer: outside the first 75% (3 of 4 layers)
    expected = {"layer0": [7], "layer1": [4], "layer2": [], "layer3": []}
    assert super_experts(peaks, layers="first_75_percent") == expected
    assert super_experts(peaks) == {**expected, "layer3": [5]}  # the function's default: every layer
    # the quantile binds when it is above max / 10; peaks all below 1 still count
    scaled = {path: value / 100 for path, value in peaks.items()}
    assert super_experts(scaled, fraction=0.0) == {**expected, "layer1": [3, 4], "layer3": [5]}
    assert super_experts({"a": torch.zeros(0), "b": torch.zeros(0)}) == {"a": [], "b": []}

