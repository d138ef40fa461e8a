"""Differential tests: each method's default selection equals its authors' rule, re-implemented here.

The `reference_*` functions are small transcriptions of the authors' published code (file and lines named
in each), written independently of the package's implementation, run on synthetic layers with planted
structure and on the shipped testbeds.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, testbed
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.surgery import LayerPlan, apply_layer_plan

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


def reference_step_loop(total_at, target, threshold=0.5):
    """merge_weight.py `__main__` (l.286-319): the step search over `total_at(threshold)`; None where the
    reference exits (ten trials in a row with one total)."""
    step, last_direction, never_changed, experts = 0.1, 0, True, []
    while True:
        total = total_at(threshold)
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


def reference_threshold_search(gates, topk, target, threshold=0.5, coactivations=None, **kwargs):
    """The step search on the layers' total cluster count, as the reference runs it."""
    coactivations = coactivations or [None] * len(gates)

    def total_at(t):
        return sum(len(reference_select_expert_pairs(g, topk[i], t, coactivation=coactivations[i], **kwargs))
                   for i, g in enumerate(gates))

    return reference_step_loop(total_at, target, threshold)


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
    assert _details(wrapped)["threshold"] == pytest.approx(threshold)  # on undivided distances
    assert min(map(len, expected)) <= 4  # 8 clusters over two layers: at least one layer is averaged
    for clusters, entry in zip(expected, wrapped.record["layers"].values(), strict=True):
        if len(clusters) <= 4:  # merge_max_clusters: the layer averages every cluster
            assert sorted(map(tuple, entry["groups"])) == sorted(clusters)


def _reference_coactivation(wrapped, gates) -> list[torch.Tensor]:
    """The reference's co-occurrence counts (`assemble_logit_patterns.py` l.29-44): the top-2 pair of every
    calibration token, per layer, diagonal 0."""
    counts = [torch.zeros(6, 6) for _ in gates]
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.router.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(wrapped.moe_layers())]
    with torch.no_grad():
        for batch in CALIB:
            wrapped.model(batch.unsqueeze(0))
            for i, hidden in captured.items():
                top = torch.topk(F.softmax(hidden.float() @ gates[i].float().T, dim=1), 2, dim=1).indices
                pairs = torch.zeros(len(top), 6, 6)
                tokens = torch.arange(len(top))
                pairs[tokens, top[:, 0], top[:, 1]] = 1
                pairs[tokens, top[:, 1], top[:, 0]] = 1
                counts[i] += pairs.sum(0)
    for hook in hooks:
        hook.remove()
    return counts


def test_stun_coactivation_distance_matches_the_reference():
    wrapped = _planted_router_layers(2)
    gates = _routers(wrapped)
    counts = _reference_coactivation(wrapped, gates)
    threshold = reference_threshold_search(gates, [4, 4], 9, threshold=-0.5, coactivations=counts, divide_mean=True)
    assert threshold is not None
    options = {"distance": "coactivation", "divide_mean": True, "threshold": -0.5}
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=9, method_options=options), calibration=CALIB)
    expected = [reference_select_expert_pairs(g, 4, threshold, coactivation=c, divide_mean=True)
                for g, c in zip(gates, counts, strict=True)]
    assert _stun_clusters(wrapped) == expected
    assert _details(wrapped)["threshold"] == pytest.approx(threshold)  # on distances divided by |mean|
    assert (_details(wrapped)["distance"], _details(wrapped)["merge_method"]) == (
        "coactivation", "greedy_but_reject_mixed")


def test_stun_mixed_distance_matches_the_reference():
    """`distance="mix"`: mix_weight * (-C / |mean C|) + the undivided router distance, as the reference."""
    wrapped = _planted_router_layers(2)
    gates = _routers(wrapped)
    counts = _reference_coactivation(wrapped, gates)
    kwargs = {"mix_weight": 0.3}
    threshold = reference_threshold_search(gates, [4, 4], 9, threshold=4.0, coactivations=counts, **kwargs)
    assert threshold is not None
    options = {"distance": "mix", "mix_weight": 0.3, "threshold": 4.0}
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=9, method_options=options), calibration=CALIB)
    expected = [reference_select_expert_pairs(g, 4, threshold, coactivation=c, **kwargs)
                for g, c in zip(gates, counts, strict=True)]
    assert _stun_clusters(wrapped) == expected
    assert _details(wrapped)["threshold"] == pytest.approx(threshold)


def test_stun_coactivation_distance_of_small_counts_is_divided_by_their_mean():
    """Counts whose mean is below 1 (few calibration tokens, or normalised counts) are still divided by it."""
    from hf_moeprune.methods.stun import coactivation_distance, mixed_distance

    counts = torch.tensor([[0.0, 0.5, 0.1], [0.5, 0.0, 0.2], [0.1, 0.2, 0.0]])
    expected = -counts / (-counts).mean().abs()
    torch.testing.assert_close(coactivation_distance(counts, divide_mean=True), expected)
    router = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    torch.testing.assert_close(mixed_distance(counts, router, 0.5), 0.5 * expected + torch.cdist(router, router))


@pytest.mark.parametrize("seed", range(40))
def test_stun_step_search_queries_the_thresholds_the_reference_queries(seed):
    """The step search on scripted totals (reachable or not): the same thresholds tried, the same end."""
    from hf_moeprune.methods.stun import step_search

    generator = torch.Generator().manual_seed(seed)
    script = torch.randint(4, 9, (60,), generator=generator).tolist()
    if seed % 2:  # long runs of one total, so the reference's ten-in-a-row exit is what ends the search
        script = [value for value in script[:6] for _ in range(7)] + [5] * 20
    target = 10 if seed % 4 == 3 else 6  # 10: never reached

    def scripted(queried):
        return lambda threshold: queried.append(threshold) or script[min(len(queried) - 1, len(script) - 1)]

    ours, theirs = [], []
    expected = reference_step_loop(scripted(theirs), target)
    if expected is None:
        advice = "choose another target, another start threshold, or method_options merge_method='complete' "
        with pytest.raises(ValueError, match=re.escape(f"exactly {target} experts") + ".*" + re.escape(advice)
                           + re.escape("(exact by bisection).")):
            step_search(scripted(ours), target, 0.5)
    else:
        assert step_search(scripted(ours), target, 0.5) == pytest.approx(expected)
    assert ours == pytest.approx(theirs)


def test_stun_top_k_option_caps_the_merges_of_every_layer():
    """The reference's `--top_k`: at most that many merges per layer, whatever the threshold allows."""
    wrapped = _planted_router_layers(0)
    gates = _routers(wrapped)
    threshold = reference_threshold_search(gates, [1, 1], 10)
    assert threshold is not None
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=10, method_options={"top_k": 1}))
    assert _stun_clusters(wrapped) == [reference_select_expert_pairs(g, 1, threshold) for g in gates]
    assert [len(c) for c in _stun_clusters(wrapped)] == [5, 5]


def test_stun_never_merges_a_layer_below_its_router_top_k():
    """A layer of identical experts would merge into one; the default cap stops it at the router's top-k (2)."""
    wrapped = _planted_router_layers(1)
    with torch.no_grad():
        first = wrapped.moe_layers()[0].router_tensors()["weight"]
        first[:] = first[0]
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=8))
    assert [len(c) for c in _stun_clusters(wrapped)] == [2, 6]


@pytest.mark.parametrize("keep", [4, 2])
def test_stun_uniform_counts_match_the_reference_default_mode(keep):
    """experts_per_layer: the reference's default mode, threshold inf and a cap of E - count merges."""
    wrapped = _planted_router_layers(3)
    gates = _routers(wrapped)
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=keep))
    expected = [reference_select_expert_pairs(g, 6 - keep, float("inf")) for g in gates]
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


# ---------------------------------------------------------------------------------------------- REAP / NAEE


def _testbed_ids(wrapped, sequences: int = 8, length: int = 64) -> torch.Tensor:
    """Calibration token ids from the testbed's own calibration documents."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(testbed.testbed_path(wrapped.model.config._name_or_path.split("/")[-1]))
    texts = [d.text for d in testbed.calibration_documents()[:sequences]]
    return torch.stack([torch.tensor(tokenizer(t)["input_ids"][:length]) for t in texts])


@torch.no_grad()
def _block_traffic(wrapped, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every MoE block over one forward of the unpruned model: `[T, H]` each."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.block.register_forward_hook(
        lambda m, a, out: seen.append((a[0].reshape(-1, a[0].shape[-1]),
                                       (out[0] if isinstance(out, tuple) else out).reshape(-1, a[0].shape[-1]))))
        for layer in wrapped.moe_layers()]
    wrapped.model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def _expert_outputs(layer, hidden: torch.Tensor) -> torch.Tensor:
    """`[E, T, H]`: every expert applied to every token (the model's own expert computation)."""
    ones = torch.ones(hidden.shape[0], 1)
    return torch.stack([
        layer.experts(hidden, torch.full((hidden.shape[0], 1), e, dtype=torch.long), ones)
        for e in range(layer.num_experts)
    ])


@torch.no_grad()
def reference_reap_pruned(
    wrapped, ids: torch.Tensor, compression_ratio: float, renormalise: bool = False
) -> list[tuple[set[int], set[int]]]:
    """CerebrasResearch/reap: `update_pruning_state` (pruning_metrics.py l.172-198) with renormalisation over
    the top-k only under norm_topk_prob (main.py l.120-124; Mixtral has none; `renormalise`), then `prune`
    (prune.py l.101-103) of int(E * ratio) experts per layer (l.261). Returns per layer the kept experts and
    the experts tied at the cut (torch.topk orders ties arbitrarily, so either may be kept)."""
    kept = []
    for layer, (hidden, _) in zip(wrapped.moe_layers(), _block_traffic(wrapped, ids), strict=True):
        logits = hidden.float() @ layer.router_tensors()["weight"].float().T
        selected = torch.topk(logits, layer.top_k, dim=-1).indices
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        if renormalise:
            weights = weights / weights.gather(1, selected).sum(1, keepdim=True)
        activations = _expert_outputs(layer, hidden)
        reap = torch.zeros(layer.num_experts)
        for i in range(layer.num_experts):
            active = (selected == i).any(dim=-1)
            if active.any():
                reap[i] = (torch.linalg.norm(activations[i, active], dim=-1) * weights[active, i]).mean()
        n = layer.num_experts
        cut, dropped = torch.topk(reap, int(n * compression_ratio), largest=False)
        tied = set(torch.nonzero(reap == cut.max()).flatten().tolist()) if len(cut) else set()
        kept.append((set(range(n)) - set(dropped.tolist()), tied))
    return kept


def _kept_sets(wrapped) -> list[set[int]]:
    return [{g[0] for g in entry["groups"]} for entry in wrapped.record["layers"].values()]


@pytest.mark.parametrize(("name", "ratio"), [("mixtral-8e", 0.5), ("mixtral-32e", 0.5), ("mixtral-32e", 0.25)])
def test_reap_matches_the_reference_on_the_testbeds(name, ratio):
    wrapped = _testbed(name)
    ids = _testbed_ids(wrapped)
    expected = reference_reap_pruned(wrapped, ids, ratio)
    wrapped.prune_experts(MoEPruneConfig(method="reap", expert_sparsity=ratio), calibration=ids)
    for kept, (reference, tied) in zip(_kept_sets(wrapped), expected, strict=True):
        assert len(kept) == len(reference) and kept - tied == reference - tied


@pytest.mark.parametrize(("family", "seed", "overrides", "gate", "renormalise"), [
    ("mixtral", 0, {}, "applied", True),  # the weight Mixtral's forward applies: renormalised over the top-k
    ("qwen3_moe", 1, {}, "reference", True),  # norm_topk_prob=True: the authors renormalise too
    ("qwen3_moe", 1, {"norm_topk_prob": False}, "reference", False),
])
def test_reap_gate_follows_norm_topk_prob_or_the_applied_option(family, seed, overrides, gate, renormalise):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model(family, seed, **overrides))
    expected = reference_reap_pruned(wrapped, CALIB, 0.5, renormalise=renormalise)
    other = reference_reap_pruned(wrapped, CALIB, 0.5, renormalise=not renormalise)
    assert [kept for kept, _ in expected] != [kept for kept, _ in other]  # the planted case tells the gates apart
    wrapped.prune_experts(MoEPruneConfig(method="reap", expert_sparsity=0.5, method_options={"gate": gate}),
                          calibration=CALIB)
    for kept, (reference, tied) in zip(_kept_sets(wrapped), expected, strict=True):
        assert len(kept) == len(reference) and kept - tied == reference - tied


def test_reap_rounds_the_pruned_count_down_like_the_reference():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))  # 6 experts
    expected = reference_reap_pruned(wrapped, CALIB, 0.4)  # int(2.4) = 2 pruned, round would also say 2
    wrapped.prune_experts(MoEPruneConfig(method="reap", expert_sparsity=0.45), calibration=CALIB)
    assert [len(k) for k in _kept_sets(wrapped)] == [6 - int(6 * 0.45)] * 2
    assert _kept_sets(wrapped) == [kept for kept, _ in expected]


def _naee_best_kept(layer, hidden: torch.Tensor, output: torch.Tensor, r: int, top_k: int | None) -> set[int]:
    """The authors' `enumerate` (model/wrapper.py l.101-126): every dropped set scored by the layer's forward
    with the dropped router logits at -inf, against the cached output."""
    n, k = layer.num_experts, top_k or layer.top_k
    logits = hidden @ layer.router_tensors()["weight"].T
    losses = {}
    for dropped in itertools.combinations(range(n), n - r):
        masked = logits.clone()
        masked[:, list(dropped)] = -float("inf")
        weights, selected = torch.topk(F.softmax(masked, dim=1, dtype=torch.float), k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        out = layer.experts(hidden, selected, weights.to(hidden.dtype))
        losses[dropped] = torch.norm(output.double() - out.double()).item()
    return set(range(n)) - set(min(losses, key=losses.get))


@torch.no_grad()
def reference_naee_kept(
    wrapped, ids: torch.Tensor, r: int, top_k: int | None = None, max_tokens: int | None = None,
    progressive: bool = False, own_target: bool = False,
) -> list[set[int]]:
    """Lucky-Lance/Expert_Sparsity `layerwise_pruning` (method/expert_pruning.py l.15-56): X and Z cached from
    one pass of the original model, each layer searched on them (`max_tokens` evenly spread rows of them).
    `progressive=True` is `progressive_pruning` (l.59-109): X from the model with the earlier layers already
    pruned, Z still the original's (`own_target`: the wrong target, the pruned model's own layer output)."""
    original = _block_traffic(wrapped, ids)
    model = copy.deepcopy(wrapped)
    kept = []
    for index, layer in enumerate(model.moe_layers()):
        hidden, output = _block_traffic(model, ids)[index] if progressive else original[index]
        if not own_target:
            output = original[index][1]
        if max_tokens is not None:
            rows = torch.linspace(0, hidden.shape[0] - 1, max_tokens).long()
            hidden, output = hidden[rows], output[rows]
        kept.append(_naee_best_kept(layer, hidden, output, r, top_k))
        apply_layer_plan(layer, LayerPlan.keep(sorted(kept[-1])), top_k)
    return kept


@pytest.mark.parametrize("keep", [6])
def test_naee_matches_the_reference_on_the_8_expert_testbed(keep):
    wrapped = _testbed("mixtral-8e")
    ids = _testbed_ids(wrapped, sequences=4, length=48)
    expected = reference_naee_kept(wrapped, ids, keep)
    wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=keep), calibration=ids, batch_size=len(ids))
    assert _kept_sets(wrapped) == expected


def test_naee_matches_the_reference_on_planted_layers():
    """Experts 1 and 3 nearly silent (dropping them reroutes their tokens to loud experts, so both keep them)."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", seed=4))
    with torch.no_grad():
        for layer in wrapped.moe_layers():
            for e in (1, 3):
                layer.expert_tensors()["down_proj"][e] *= 1e-2
    expected = reference_naee_kept(wrapped, CALIB, 4)
    wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=4), calibration=CALIB, batch_size=len(CALIB))
    assert _kept_sets(wrapped) == expected
    assert all({1, 3} <= kept for kept in expected)


@pytest.mark.parametrize(("options", "top_k", "reference", "without"), [
    # progressive_pruning: pruned inputs against the original model's outputs (not the pruned model's own)
    ({"inputs": "pruned"}, None, {"progressive": True}, {"progressive": True, "own_target": True}),
    ({"max_tokens": 8}, None, {"max_tokens": 8}, {}),
    # the search scores each subset with the top-k the pruned model will route with
    ({}, 1, {"top_k": 1}, {}),
])
def test_naee_options_match_the_reference(options, top_k, reference, without):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", num_hidden_layers=3))
    expected = reference_naee_kept(wrapped, CALIB, 3, **reference)
    assert expected != reference_naee_kept(wrapped, CALIB, 3, **without)  # the option changes the answer here
    wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=3, top_k=top_k, method_options=options),
                          calibration=CALIB, batch_size=len(CALIB))
    assert _kept_sets(wrapped) == expected


# ----------------------------------------------------------------------------------------------- OWL


def reference_owl_sparsities(outlier_ratios: list[float], sparsity: float, lamda: float = 0.08) -> list[float]:
    """luuyin/OWL `prune_wanda_outlier` (STUN's copy `OWL/lib/prune_all.py` l.926-938): ratios mapped onto
    [0, 2 lamda], centred, and 1 - (that + 1 - sparsity) is each layer's sparsity."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    ratios = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lamda * 2)
    density = ratios - ratios.mean() + (1 - sparsity)
    return (1 - density).tolist()


@torch.no_grad()
def reference_outlier_ratio(scores: list[torch.Tensor], m: float = 3.0) -> float:
    """`check_outlier_mean` over the concatenated Wanda scores of a layer (prune_all.py l.133-150), as a share."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


def test_owl_layer_sparsities_follow_the_reference_rule():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral", num_hidden_layers=3))
    with torch.no_grad():  # one layer with strong outlier columns, so the ratios differ
        wrapped.moe_layers()[1].expert_tensors()["down_proj"][:, :, :4] *= 20
    wrapped.prune_experts(MoEPruneConfig(method="owl", weight_sparsity=0.5), calibration=CALIB)
    details = _details(wrapped)
    ratios = list(details["outlier_ratios"].values())
    assert len(set(ratios)) > 1
    expected = reference_owl_sparsities(ratios, 0.5)
    assert list(details["layer_sparsity"].values()) == pytest.approx(expected, abs=1e-4)
    assert sum(expected) / len(expected) == pytest.approx(0.5)


def test_owl_outlier_ratio_uses_the_reference_default_m():
    """Single-expert-layer check of M = 3: the recorded share equals check_outlier_mean on the same scores."""
    from hf_moeprune.calibration.statistics import collect_statistics
    from hf_moeprune.methods.unstructured import wanda_scores

    model = build_tiny_model("mixtral", num_hidden_layers=1)
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    layer = wrapped.moe_layers()[0]
    stats = collect_statistics(model, [layer], [CALIB], progress=False)[layer.path]
    scores = []
    for spec in layer.expert_tensor_specs():
        if spec.in_axis is None:
            continue
        sq = stats.input_sq if spec.input_kind == "hidden" else stats.intermediate_sq
        weight = layer.expert_tensors()[spec.name]
        for e in range(layer.num_experts):
            norm = sq[e, : weight[e].shape[spec.in_axis]].clamp(min=0).sqrt()
            scores.append(wanda_scores(weight[e], norm, spec.in_axis))
    expected = reference_outlier_ratio(scores)
    wrapped.prune_experts(MoEPruneConfig(method="owl", weight_sparsity=0.5), calibration=CALIB)
    assert list(_details(wrapped)["outlier_ratios"].values()) == pytest.approx([expected], abs=1e-6)
