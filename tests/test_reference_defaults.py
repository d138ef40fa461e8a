"""Differential tests: each method's default selection equals its authors' rule, re-implemented here.

The `reference_*` functions are small transcriptions of the authors' published code (file and lines named
in each), written independently of the package's implementation, run on synthetic layers with planted
structure and on the shipped testbeds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, testbed
from hf_moeprune.config import MoEPruneConfig

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))


def _testbed(name: str):
    path = testbed.testbed_path(name)
    if not (path / "model.safetensors").exists():
        pytest.skip(f"testbed {name} not shipped")
    return AutoMoEPruneModelForCausalLM.from_pretrained(path)


def _details(wrapped) -> dict:
    return wrapped.record["steps"][-1]["details"]


# ---------------------------------------------------------------------------------------------- STUN


def reference_select_expert_pairs(gate_weight, topk, threshold, division_by_norm=True, coactivation=None,
                                  mix_weight=None, divide_mean=False):
    """thnkinbtfly/STUN merge_weight.py `select_expert_pairs` (l.52-113), as a set of sorted tuples."""
    if coactivation is not None:
        dist = -coactivation.float()
        if mix_weight:
            dist = dist / dist.mean().abs() * mix_weight + torch.cdist(gate_weight.float(), gate_weight.float())
        elif divide_mean:
            dist = dist / dist.mean().abs()
    else:
        dist = torch.cdist(gate_weight.float(), gate_weight.float())
        if division_by_norm:
            dist = dist / torch.norm(gate_weight.float())
    values = dist.clone()
    n = len(gate_weight)
    for i in range(n):
        values[i][i] = float("inf")
    vertex_to_cluster = {i: {i} for i in range(n)}
    while torch.min(values) < threshold:
        if len({tuple(sorted(s)) for s in vertex_to_cluster.values()}) <= n - topk:
            break
        v1, v2 = (int(i) for i in torch.unravel_index(torch.argmin(values.flatten()), values.shape))
        lengths = [values[c, v2] for c in vertex_to_cluster[v1]] + [values[c, v1] for c in vertex_to_cluster[v2]]
        if max(lengths) < threshold:
            union = vertex_to_cluster[v1] | vertex_to_cluster[v2]
            for c in vertex_to_cluster[v1]:
                values[c, v2] = float("inf")
            for c in vertex_to_cluster[v2]:
                values[c, v1] = float("inf")
            for v in union:
                vertex_to_cluster[v] = union
        else:
            values[v1, v2] = float("inf")
            values[v2, v1] = float("inf")
    return {tuple(sorted(s)) for s in vertex_to_cluster.values()}


def reference_threshold_search(gates, topk, target, threshold=0.5, coactivations=None, **kwargs):
    """merge_weight.py `__main__` (l.286-319): the step search; None where the reference exits."""
    step, last_direction, never_changed, experts = 0.1, 0, True, []
    coactivations = coactivations or [None] * len(gates)
    while True:
        total = sum(len(reference_select_expert_pairs(g, topk[i], threshold, coactivation=coactivations[i], **kwargs))
                    for i, g in enumerate(gates))
        if total < target:
            direction = -1
        elif total > target:
            direction = 1
        else:
            return threshold
        experts.append(total)
        if len(experts) > 10 and min(experts[-10:]) == max(experts[-10:]):
            return None
        if last_direction * direction < 0:
            never_changed = False
        step = step * 2 if never_changed else step / 2
        threshold += step * direction
        last_direction = direction


def _routers(wrapped) -> list[torch.Tensor]:
    return [layer.router_tensors()["weight"].detach().clone() for layer in wrapped.moe_layers()]


def _stun_clusters(wrapped) -> list[set[tuple[int, ...]]]:
    return [{tuple(c) for c in clusters} for clusters in _details(wrapped)["clusters"].values()]


@torch.no_grad()
def _planted_router_layers(seed: int):
    """Tiny Mixtral, 6 experts x 2 layers, router rows in planted near-groups of varying tightness."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", seed=seed))
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(wrapped.moe_layers()):
        router = layer.router_tensors()["weight"]
        router.normal_(0, 1.0, generator=generator)
        spread = 0.05 * (index + 1)
        for leader, members in ((0, (1, 2)), (3, (4,))):
            for m in members:
                router[m] = router[leader] + spread * torch.randn(router.shape[1], generator=generator)
    return wrapped


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("total", [8, 9, 10])
def test_stun_global_threshold_matches_the_reference_on_planted_layers(seed, total):
    wrapped = _planted_router_layers(seed)
    gates = _routers(wrapped)
    topk = [6 - 2] * len(gates)  # default cap: never below the router's top-k of 2
    threshold = reference_threshold_search(gates, topk, total)
    config = MoEPruneConfig(method="stun", num_experts_total=total)
    if threshold is None:
        with pytest.raises(ValueError, match="step search"):
            wrapped.prune_experts(config)
        return
    wrapped.prune_experts(config)
    assert _stun_clusters(wrapped) == [reference_select_expert_pairs(g, 4, threshold) for g in gates]
    assert _details(wrapped)["threshold"] == pytest.approx(threshold)


def test_stun_readme_options_match_the_reference():
    """The README's flags: no division by norm, a merge cap, averaged small layers."""
    wrapped = _planted_router_layers(1)
    gates = _routers(wrapped)
    threshold = reference_threshold_search(gates, [3, 3], 8, threshold=0.5, division_by_norm=False)
    assert threshold is not None
    options = {"division_by_norm": False, "top_k": 3, "merge_max_clusters": 4, "threshold": 0.5}
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=8, method_options=options))
    expected = [reference_select_expert_pairs(g, 3, threshold, division_by_norm=False) for g in gates]
    assert _stun_clusters(wrapped) == expected
    for clusters, entry in zip(expected, wrapped.record["layers"].values(), strict=True):
        if len(clusters) <= 4:  # merge_max_clusters: the layer averages every cluster
            assert sorted(map(tuple, entry["groups"])) == sorted(clusters)


def test_stun_coactivation_distance_matches_the_reference():
    wrapped = _planted_router_layers(2)
    model = wrapped.model
    gates = _routers(wrapped)
    # the reference's co-occurrence counts: top-2 pairs of every calibration token, per layer (diagonal 0)
    counts = [torch.zeros(6, 6) for _ in gates]
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.router.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(wrapped.moe_layers())]
    with torch.no_grad():
        for batch in CALIB:
            model(batch.unsqueeze(0))
            for i, hidden in captured.items():
                top = torch.topk(F.softmax(hidden.float() @ gates[i].float().T, dim=1), 2, dim=1).indices
                pairs = torch.zeros(len(top), 6, 6)  # assemble_logit_patterns.py l.29-44
                tokens = torch.arange(len(top))
                pairs[tokens, top[:, 0], top[:, 1]] = 1
                pairs[tokens, top[:, 1], top[:, 0]] = 1
                counts[i] += pairs.sum(0)
    for hook in hooks:
        hook.remove()
    threshold = reference_threshold_search(gates, [4, 4], 9, threshold=-0.5, coactivations=counts, divide_mean=True)
    assert threshold is not None
    options = {"distance": "coactivation", "divide_mean": True, "threshold": -0.5}
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=9, method_options=options), calibration=CALIB)
    expected = [reference_select_expert_pairs(g, 4, threshold, coactivation=c, divide_mean=True)
                for g, c in zip(gates, counts, strict=True)]
    assert _stun_clusters(wrapped) == expected


@pytest.mark.parametrize("uniform_count", [6, 4])
def test_stun_uniform_counts_match_the_reference_default_mode(uniform_count):
    """experts_per_layer: the reference's default mode, threshold inf and a cap of E - count merges."""
    wrapped = _planted_router_layers(3)
    gates = _routers(wrapped)
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=uniform_count - 2))
    expected = [reference_select_expert_pairs(g, 6 - (uniform_count - 2), float("inf")) for g in gates]
    assert _stun_clusters(wrapped) == expected


@pytest.mark.parametrize("total", [96, 64])
def test_stun_matches_the_reference_on_the_32_expert_testbed(total):
    wrapped = _testbed("mixtral-32e")
    gates = _routers(wrapped)
    threshold = reference_threshold_search(gates, [30] * len(gates), total)
    if threshold is None:
        pytest.skip("the reference's step search does not reach this total")
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=total))
    assert _stun_clusters(wrapped) == [reference_select_expert_pairs(g, 30, threshold) for g in gates]
