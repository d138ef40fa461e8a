"""Expert-pruning baselines under the same API: NAEE (planted redundancy, refusal), REAP (saliency, super experts)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.reap import reap_scores, super_experts

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


def test_reap_scoring_functions():
    scores = reap_scores(torch.tensor([4.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 3.0]))
    assert scores.tolist() == [2.0, 0.0, 1.0]
    found = super_experts({"a": torch.tensor([1.0, 1.2, 50.0]), "b": torch.ones(200)})
    assert found == {"a": [2], "b": []}

