"""Scoring rules on hand-made statistics whose answer is worked out by hand.

Written to kill the mutants that `make mutate` found surviving in frequency and STUN: a flipped tie-break, the
adaptive (global) budget, a dropped `top_k`, the co-activation distance formula and STUN's default phase-2
algorithm. Each test says which rule it pins.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.calibration import LayerStatistics
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods import get_method
from hf_moeprune.methods.merging import frequency_counts
from hf_moeprune.methods.stun import coactivation_distance
from hf_moeprune.pipeline import Observation
from hf_moeprune.pipeline.units import decoder_units

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


def _frequency_plan(
    counts: list[list[float]], mass: list[list[float]], tokens: int, **target
) -> list[list[int]]:
    """Frequency's kept experts per layer for the given routed counts and router-probability mass."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    layers = wrapped.moe_layers()
    statistics = {}
    for layer, layer_counts, layer_mass in zip(layers, counts, mass, strict=True):
        stats = LayerStatistics(layer.num_experts, 64, 48)
        stats.tokens = tokens
        stats.counts = torch.tensor(layer_counts, dtype=torch.float64)
        stats.prob_mass = torch.tensor(layer_mass, dtype=torch.float64)
        statistics[layer.path] = stats
    config = MoEPruneConfig(method="frequency", **target)
    method = get_method("frequency")(config)
    method.validate(layers)
    units = decoder_units(wrapped.model, layers)  # the pipeline's hooks, fed the hand-made statistics
    seen = {u.path: Observation(statistics={m.path: statistics[m.path] for m in u.moe_layers}) for u in units}
    if method.needs.global_decision:
        seen = {u.path: method.summarize(u, seen[u.path]) for u in units}
        decision = method.decide(seen, layers)
    else:
        decision = method.decide(None, layers)
    plans = {path: plan for u in units for path, plan in method.reduce(u, seen[u.path], decision).plans.items()}
    return [sorted(g[0] for g in plans[layer.path].groups) for layer in layers]


def test_frequency_breaks_count_ties_by_router_probability_mass():
    """Experts 0 and 1 route the same number of tokens; expert 1 has more probability mass, so it stays.
    Catches a tie-break of the wrong sign."""
    counts = [[10, 10, 30, 30, 5, 5]] * 2
    mass = [[2.0, 3.0, 8.0, 8.0, 1.0, 1.0]] * 2
    assert _frequency_plan(counts, mass, tokens=45, experts_per_layer=3) == [[1, 2, 3]] * 2


def test_frequency_ranks_by_count_before_mass():
    """Expert 0 routes 100 of 10,000 tokens more than expert 1 but has far less mass: the count decides.
    Catches a tie-break weighted so heavily (or scaled by the token count) that mass overrides the count."""
    counts = [[1100, 1000, 3000, 3000, 500, 500]] * 2
    mass = [[50.0, 900.0, 3000.0, 3000.0, 500.0, 500.0]] * 2
    assert _frequency_plan(counts, mass, tokens=10_000, experts_per_layer=3) == [[0, 2, 3]] * 2


def test_adaptive_frequency_spends_the_budget_on_the_busiest_experts_model_wide():
    """7 of 12 experts, top-2: each layer keeps its 2 most used, then the 3 highest remaining shares
    model-wide: layer 1's expert 2 (80/273) and layer 0's experts 2 and 3 (18/105, 17/105). Catches a
    per-layer split of the budget, a budget step other than one expert and a ranking of the wrong sign."""
    counts = [[20, 19, 18, 17, 16, 15], [100, 90, 80, 1, 1, 1]]
    mass = [[1.0] * 6, [1.0] * 6]
    kept = _frequency_plan(counts, mass, tokens=200, num_experts_total=7, adaptive=True)
    assert kept == [[0, 1, 2, 3], [0, 1, 2]]


def test_global_frequency_counts_lift_each_layers_top_experts_and_share_out_dead_layers():
    """MC-SMoE's `_assign_num_groups_per_layer`: shares of each layer's routed tokens, the top-k (here 1) of a
    layer lifted to 1.0, keep what is strictly above the (budget + 1)-th largest. A layer no token reached
    counts as uniform (0.25 each); counts already given as shares (sum 1) are used as they are."""
    tokens = {"a": torch.tensor([50.0, 30, 15, 5]), "b": torch.zeros(4)}
    # sorted: a 1.0 (lifted), b 1.0 (lifted), a 0.3, b 0.25 x3, ...: the 4th value 0.25 is the threshold
    assert frequency_counts(tokens, 3, {"a": 1, "b": 1}) == {"a": 2, "b": 1}
    shares = {"a": tokens["a"] / 100, "b": torch.tensor([0.4, 0.35, 0.2, 0.05])}
    assert frequency_counts(shares, 3, {"a": 1, "b": 1}) == {"a": 1, "b": 2}
    assert frequency_counts(tokens, 2, {"a": 1, "b": 1}) == {"a": 1, "b": 1}  # the floors exactly
    with pytest.raises(ValueError, match="budget of 1 experts leaves some layer below its top-k"):
        frequency_counts(tokens, 1, {"a": 1, "b": 1})


def test_frequency_applies_a_requested_top_k():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    wrapped.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3, top_k=1), calibration=CALIB)
    assert all(layer.top_k == 1 for layer in wrapped.moe_layers())
    assert wrapped.model.config.num_experts_per_tok == 1


def test_coactivation_distance_is_minus_the_co_routing_counts():
    """The reference's rule: d_ij = -C_ij (diagonal 0); with divide_mean, divided by |mean(d)| over all n^2
    entries. Catches a dropped sign, a kept diagonal and a mean over the wrong entries."""
    c = torch.tensor([[4.0, 2.0, 0.0], [2.0, 9.0, 6.0], [0.0, 6.0, 4.0]])
    expected = -torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 6.0], [0.0, 6.0, 0.0]])
    assert torch.equal(coactivation_distance(c), expected)
    assert torch.equal(coactivation_distance(c, divide_mean=True), expected / (16 / 9))


@pytest.mark.parametrize("nm, algorithm", [(None, "owl"), ((2, 4), "wanda")])
def test_stun_phase_two_defaults_to_owl_and_to_wanda_for_n_m_patterns(nm, algorithm):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    sparsity = {"nm_pattern": nm} if nm else {"weight_sparsity": 0.5}
    wrapped.prune_experts(
        MoEPruneConfig(method="stun", expert_sparsity=0.25, **sparsity), calibration=CALIB, batch_size=2
    )
    assert wrapped.record["steps"][-1]["details"]["unstructured"]["algorithm"] == algorithm
