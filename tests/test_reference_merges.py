"""Differential tests for the merges and frequency pruning: each default grouping equals its authors' rule.

The `reference_*` functions transcribe the authors' published code (file and lines in each docstring),
written independently of the package: HC-SMoE (wazenmai/HC-SMoE) and MC-SMoE (UNITES-Lab/MC-SMoE, its Mixtral
path). They run on planted tiny layers and on the shipped testbeds.
"""

from __future__ import annotations

import copy
import functools
import logging
from contextlib import contextmanager

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, make_unselectable
from test_reference_defaults import CALIB, _details, _testbed, _testbed_ids

from hf_moeprune import AutoMoEPruneModelForCausalLM, AutoMoEPruneModelForSeq2SeqLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods import get_method
from hf_moeprune.methods.merging import frequency_counts
from hf_moeprune.methods.merging.outputs import mean_expert_outputs

Partition = set[frozenset[int]]


def _partition(groups) -> Partition:
    return {frozenset(int(e) for e in group) for group in groups}


def _recorded_partitions(wrapped) -> list[Partition]:
    return [_partition(entry["groups"]) for entry in wrapped.record["layers"].values()]


# --------------------------------------------------------------------------------------------- HC-SMoE


def _every_expert_on_every_token(layer, hidden: torch.Tensor) -> torch.Tensor:
    """`[E, T, H]` raw expert outputs, by the model's own experts module (one call: each token sent to each
    expert once with weight 1)."""
    num, tokens = layer.num_experts, hidden.shape[0]
    index = torch.arange(num).repeat_interleave(tokens).unsqueeze(-1)
    return layer.experts(hidden.repeat(num, 1), index, torch.ones(index.shape, dtype=hidden.dtype)).view(num, tokens, -1)


@torch.no_grad()
def reference_hc_smoe_features(layer, hidden: torch.Tensor) -> torch.Tensor:
    """HC-SMoE `hcsmoe/merging/grouping_mixtral.py` `group_experts_by_clustering_output` l.452-458: every
    expert applied to ALL the layer's calibration inputs, averaged over the tokens."""
    return _every_expert_on_every_token(layer, hidden).float().mean(dim=1)


@torch.no_grad()
def reference_hierarchical_average(features: torch.Tensor, n_clusters: int) -> Partition:
    """HC-SMoE `hcsmoe/merging/clustering.py` `hierarchical_clustering` l.321-351 with `pairwise_distances`
    l.256-267 and the average linkage of `compute_distance` l.208-229 / `linkage_step` l.270-296: Euclidean
    distances from the float32 Gram matrix; repeatedly merge the two clusters with the smallest mean pairwise
    distance (first in row-major order over the sorted labels); cluster j joins cluster i < j."""
    x = features.float()
    dot = x @ x.T
    square = dot.diag()
    distance = (square.unsqueeze(0) - 2.0 * dot + square.unsqueeze(1)).clamp(min=0.0).sqrt()
    pair_distance = distance.tolist()
    clusters = torch.arange(x.shape[0])
    while len(torch.unique(clusters)) > n_clusters:
        labels = torch.unique(clusters)
        members = [torch.where(clusters == c)[0].tolist() for c in labels]
        between = torch.zeros(len(labels), len(labels))
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                pairs = [pair_distance[vi][vj] for vi in members[i] for vj in members[j]]
                between[i, j] = between[j, i] = torch.sum(torch.tensor(pairs)) / (len(members[i]) * len(members[j]))
        between.fill_diagonal_(float("inf"))
        index = int(torch.argmin(between))
        a, b = sorted((int(labels[index // len(labels)]), int(labels[index % len(labels)])))
        clusters[clusters == clusters[b]] = clusters[a]
    return {frozenset(torch.where(clusters == c)[0].tolist()) for c in torch.unique(clusters)}


def reference_hc_smoe_groups(original, traffic: dict, keep: int) -> list[Partition]:
    """HC-SMoE's published command (`scripts/mixtral/run.sh`: `--dominant=no --similarity_base=expert-output
    --linkage=average`), per layer on the MoE inputs of the original model."""
    return [
        reference_hierarchical_average(reference_hc_smoe_features(layer, traffic[layer.path][0]), keep)
        for layer in original.moe_layers()
    ]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_all_token_mean_outputs_match_one_expert_at_a_time(family):
    """Every family: the batched all-token means (chunks of 3 tokens here) equal each expert run on its own."""
    layer = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model(family)).moe_layers()[0]
    x = torch.randn(10, layer.router_tensors()["weight"].shape[1], generator=torch.Generator().manual_seed(0))
    single = []
    for e in range(layer.num_experts):
        if layer.spec.expert_layout == "modules":
            single.append(layer.expert_module(e)(x))
        else:
            single.append(layer.experts(x, torch.full((10, 1), e), torch.ones(10, 1)))
    expected = torch.stack(single).double().mean(1)
    found = mean_expert_outputs(layer, x, rows_per_call=3 * layer.num_experts)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
    assert found.abs().sum() > 0


# --------------------------------------------------------------------------------------------- MC-SMoE


def reference_usage_frequency(logits: torch.Tensor) -> torch.Tensor:
    """MC-SMoE `mcsmoe/merging/grouping_mixtral.py` `compute_all_usages` l.193-219: top-2 routed counts of
    the layer's experts, divided by their sum."""
    selected = torch.topk(logits, 2, dim=-1)[1].reshape(-1)
    counts = torch.zeros(logits.shape[1])
    unique, found = torch.unique(selected, return_counts=True)
    counts[unique] += found.float()
    return counts / counts.sum()


def reference_groups_per_layer(usages: list[torch.Tensor], num_average_groups: int, floor: int = 1) -> list[int]:
    """`_assign_num_groups_per_layer` l.91-135: each layer's most used expert set to 1.0, the threshold is
    the (L * num_average_groups + 1)-th largest value over all layers, a layer keeps the experts strictly above
    it. `floor` > 1 lifts that many experts per layer (this package's top-k floor; the reference lifts one)."""
    lifted = []
    for usage in usages:
        usage = usage.clone()
        usage[torch.argsort(usage, descending=True, stable=True)[:floor]] = 1.0
        lifted.append(usage)
    threshold = torch.sort(torch.cat(lifted), descending=True).values[num_average_groups * len(usages)]
    assert threshold < 1.0
    return [int((usage > threshold).sum()) for usage in lifted]


def reference_dominant_grouping(usage: torch.Tensor, logits: torch.Tensor, num_groups: int) -> Partition:
    """`group_experts_globally_from_dominant_experts` l.165-189: the `num_groups` most used experts are
    dominant; every other expert, in usage order, joins the dominant expert with the most similar router-logit
    column, (cos + 1) / 2 (`_compute_all_similarities_by_router_logits` l.272-298, `SIMILARITY_MAPPING_FUNCTION`)."""
    order = torch.argsort(usage, descending=True, stable=True)
    core = order[:num_groups]
    label = {int(e): i for i, e in enumerate(core)}
    for e in order[num_groups:].tolist():
        similarity = [(torch.nn.functional.cosine_similarity(logits[:, e], logits[:, c], dim=0) + 1) / 2 for c in core]
        label[e] = label[int(core[int(torch.argmax(torch.stack(similarity)))])]
    return {frozenset(e for e, g in label.items() if g == group) for group in set(label.values())}


def reference_mc_smoe_groups(traffic: dict, num_average_groups: int, floor: int = 1) -> list[Partition]:
    """MC-SMoE's Mixtral script (`mcsmoe/msmoe-merging-mixtral.py` l.39-48) on the original model's logits."""
    logits = [layer_logits for _, layer_logits in traffic.values()]
    usages = [reference_usage_frequency(layer_logits) for layer_logits in logits]
    counts = reference_groups_per_layer(usages, num_average_groups, floor)
    return [reference_dominant_grouping(u, lg, n) for u, lg, n in zip(usages, logits, counts, strict=True)]


# ------------------------------------------------------------------------------------------------ runs


@contextmanager
def calibration_traffic(wrapped, tokens: int):
    """Each MoE block's inputs and router logits on the first `tokens` calibration tokens the package's own
    pass feeds it (its first sweep sees the original model), so reference and package read the same numbers."""
    seen: dict[str, tuple[list, list]] = {layer.path: ([], []) for layer in wrapped.moe_layers()}
    hooks = []
    for layer in wrapped.moe_layers():
        inputs, logits = seen[layer.path]
        hooks.append(layer.block.register_forward_pre_hook(
            lambda m, a, inputs=inputs: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())))
        hooks.append(layer.router.register_forward_hook(
            lambda m, a, out, logits=logits: logits.append(out[0].detach().reshape(-1, out[0].shape[-1]).float())))
    traffic: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        yield traffic
    finally:
        for hook in hooks:
            hook.remove()
    for path, (inputs, logits) in seen.items():
        traffic[path] = (torch.cat(inputs)[:tokens], torch.cat(logits)[:tokens])


@functools.cache
def calibration_ids(name: str) -> torch.Tensor:
    """Four calibration sequences of the testbed's own calibration documents, tokenised once per test run."""
    return _testbed_ids(_testbed(name), sequences=4)


def merged_with_traffic(name_or_model, ids: torch.Tensor, config: MoEPruneConfig):
    """(reduced wrapper, untouched copy of the original, the traffic of the package's calibration pass)."""
    if isinstance(name_or_model, str):  # float32: bf16 matmuls are slow on CPU, and the rule is the same
        name_or_model = _testbed(name_or_model).model.float()
    wrapped = AutoMoEPruneModelForCausalLM.from_model(name_or_model)
    original = AutoMoEPruneModelForCausalLM.from_model(copy.deepcopy(name_or_model))
    wrapped.progress = False
    reduce = wrapped.merge_experts if get_method(config.method).kind == "merge" else wrapped.prune_experts
    with calibration_traffic(wrapped, ids.numel()) as traffic:
        reduce(config, calibration=ids)
    return wrapped, original, traffic


# ------------------------------------------------------------------------------------------- HC-SMoE tests


@pytest.mark.parametrize(("name", "keep"), [("mixtral-8e", 4), ("mixtral-32e", 8)])
def test_hc_smoe_default_groups_match_the_reference_on_the_testbeds(name, keep):
    ids = calibration_ids(name)
    wrapped, original, traffic = merged_with_traffic(name, ids, MoEPruneConfig(method="hc-smoe", experts_per_layer=keep))
    assert _recorded_partitions(wrapped) == reference_hc_smoe_groups(original, traffic, keep)


@torch.no_grad()
def _copied_experts(seed: int):
    """Tiny Mixtral (6 experts x 2 layers): experts 3, 4, 5 carry the weights of 0, 1, 2 (noise 1e-3) but keep
    their own router rows, so each pair computes one function on different routed tokens."""
    model = build_tiny_model("mixtral", seed=seed)
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in wrapped.moe_layers():
        for tensor in layer.expert_tensors().values():
            for a in (0, 1, 2):
                tensor[a + 3] = tensor[a] + 1e-3 * torch.randn(tensor[a].shape, generator=generator)
    return model


@pytest.mark.parametrize("seed", range(2))
def test_hc_smoe_matches_the_reference_on_planted_copies(seed):
    wrapped, original, traffic = merged_with_traffic(
        _copied_experts(seed), CALIB, MoEPruneConfig(method="hc-smoe", experts_per_layer=3))
    expected = reference_hc_smoe_groups(original, traffic, 3)
    assert _recorded_partitions(wrapped) == expected
    assert expected == [_partition([[0, 3], [1, 4], [2, 5]])] * 2  # the all-token means see the copies


def test_hc_smoe_routed_option_clusters_routed_token_means():
    """`expert_output_tokens="routed"`: each expert's mean output over the tokens its router sends it."""
    options = {"expert_output_tokens": "routed"}
    wrapped, original, traffic = merged_with_traffic(
        _copied_experts(0), CALIB, MoEPruneConfig(method="hc-smoe", experts_per_layer=3, method_options=options))
    expected = []
    for layer in original.moe_layers():
        hidden, logits = traffic[layer.path]
        routed = torch.zeros(len(hidden), layer.num_experts, dtype=torch.bool)
        routed.scatter_(1, torch.topk(logits, layer.top_k, dim=-1).indices, True)
        outputs = _every_expert_on_every_token(layer, hidden).float()
        means = torch.stack([outputs[e, routed[:, e]].mean(0) for e in range(layer.num_experts)])
        expected.append(reference_hierarchical_average(means, 3))
    assert _recorded_partitions(wrapped) == expected


# ------------------------------------------------------------------------------------------- MC-SMoE tests


@pytest.mark.parametrize(("name", "groups"), [("mixtral-8e", 4), ("mixtral-32e", 8)])
def test_mc_smoe_default_groups_match_the_reference_on_the_testbeds(name, groups):
    """The reference's `num_average_groups=g` is a budget of g experts per layer on average."""
    ids = calibration_ids(name)
    config = MoEPruneConfig(method="mc-smoe", num_experts_total=groups * 4)
    wrapped, _, traffic = merged_with_traffic(name, ids, config)
    expected = reference_mc_smoe_groups(traffic, groups)
    assert _recorded_partitions(wrapped) == expected
    assert _details(wrapped)["options"]["alignment"] == "none"


@pytest.mark.parametrize("groups", [3, 4])
def test_mc_smoe_matches_the_reference_on_a_tiny_model(groups):
    wrapped, _, traffic = merged_with_traffic(
        build_tiny_model("mixtral", seed=3), CALIB, MoEPruneConfig(method="mc-smoe", num_experts_total=2 * groups))
    expected = reference_mc_smoe_groups(traffic, groups)
    if min(map(len, expected)) < 2:  # below the router's top-k: the package keeps the top-2 (see the next test)
        expected = reference_mc_smoe_groups(traffic, groups, floor=2)
    assert _recorded_partitions(wrapped) == expected


@pytest.mark.parametrize("seed", range(12))
def test_mc_smoe_counts_follow_the_reference_threshold(seed):
    """Planted routed counts over 4 layers of 8 experts, with ties: the package's counts equal the reference's
    wherever it keeps top-k (2) experts in every layer, and the reference rule with 2 lifted experts elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    skew = torch.rand(4, 1, generator=generator) * 3
    counts = (torch.rand(4, 8, generator=generator) ** (1 + skew) * 40).round()  # small integers: ties are common
    counts[:, 0] += 1
    usages = [row / row.sum() for row in counts]
    for groups in (3, 4, 5):
        reference = reference_groups_per_layer(usages, groups)
        expected = reference if min(reference) >= 2 else reference_groups_per_layer(usages, groups, floor=2)
        found = frequency_counts({str(i): row for i, row in enumerate(counts)}, groups * 4, dict.fromkeys("0123", 2))
        assert list(found.values()) == expected
        exact = frequency_counts({str(i): row for i, row in enumerate(counts)}, groups * 4, dict.fromkeys("0123", 2),
                                 exact=True)
        assert sum(exact.values()) == groups * 4 and all(v >= e for v, e in zip(exact.values(), expected, strict=True))


def test_mc_smoe_uniform_keeps_one_count_per_layer_and_loads_in_transformers(tmp_path):
    """`uniform=True`: every layer keeps the same count, its most used experts dominant (the layerwise rule,
    HC-SMoE's `group_experts_layerwise_by_freq` l.877-896), and the checkpoint is the family's own
    architecture: plain transformers loads it with identical logits."""
    from transformers import AutoModelForCausalLM

    config = MoEPruneConfig(method="mc-smoe", expert_sparsity=0.5, method_options={"uniform": True})
    wrapped, _, traffic = merged_with_traffic(build_tiny_model("mixtral", seed=3), CALIB, config)
    expected = [reference_dominant_grouping(reference_usage_frequency(logits), logits, 3) for _, logits in traffic.values()]
    assert _recorded_partitions(wrapped) == expected
    wrapped.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_local_experts == 3
    torch.testing.assert_close(reloaded(CALIB).logits, wrapped.model(CALIB).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("exact", "expected"), [(False, [4, 4]), (True, [6, 4])])
def test_mc_smoe_exact_budget_takes_the_tied_shares_in_layer_order(exact, expected, caplog):
    """Experts 4 and 5 of both layers get no token. With 10 of 12 experts budgeted the threshold share is 0:
    the reference rule keeps the 8 used experts, under the budget (and says so); exact_budget fills it with
    the tied zero-share experts, layer 0's first. The record keeps the counts and the budget."""
    ids = CALIB[:2]
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    make_unselectable(wrapped.model, wrapped.moe_layers(), [4, 5], ids)
    config = MoEPruneConfig(method="mc-smoe", num_experts_total=10, method_options={"exact_budget": exact})
    with caplog.at_level(logging.INFO, logger="hf_moeprune.methods.merging.pipeline"):
        merged, _, traffic = merged_with_traffic(wrapped.model, ids, config)
    assert all(int((logits.topk(2).indices >= 4).sum()) == 0 for _, logits in traffic.values())
    assert [s["num_experts"] for s in merged.summary()] == expected
    details = _details(merged)
    assert list(details["experts_per_layer"].values()) == expected and details["budget"] == 10
    under = "mc-smoe: shares tied at the frequency threshold keep 8 experts of the 10 budgeted (method_options " \
        "exact_budget=True fills the budget)"
    assert [m for m in caplog.messages if "shares tied" in m] == ([] if exact else [under])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(experts_per_layer=3, adaptive=True, method_options={"uniform": True}),
     r"^method_options uniform=True asks for one count per layer, adaptive=True for per-layer counts; drop one of "
     r"them\.$"),
    (dict(experts_per_layer=3, method_options={"bogus": 1, "alignment": "none"}),
     r"Unknown option\(s\) \['bogus'\] for method 'mc-smoe'; known: adaptive_by, alignment, alignment_solver, "),
    (dict(experts_per_layer=3, method_options={"linkage": "median"}),
     r"method_options\['linkage'\]='median'; use one of average, complete, single, ward"),
    (dict(experts_per_layer=3, method_options={"alignment_sketch": 0}), "'auto', None or a positive int, got 0"),
    (dict(experts_per_layer=3, method_options={"alignment_sketch": "big"}), "'auto', None or a positive int"),
    (dict(experts_per_layer=3, method_options={"alignment_tokens": 0}),
     r"^method_options\['alignment_tokens'\] must be a positive int\.$"),
    (dict(experts_per_layer=3, method_options={"alignment_tokens": 8.0}), "alignment_tokens'] must be a positive"),
    (dict(expert_sparsity=0.5, method_options={"uniform": "yes"}), "uniform.*true or false"),
    (dict(expert_sparsity=0.5, method_options={"exact_budget": 1}), "exact_budget.*true or false"),
    (dict(experts_per_layer=3, method_options={"expert_output_tokens": "some"}), "all, routed"),
])
def test_bad_merge_options_fail_before_calibration(kwargs, message):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    calls = []
    wrapped.model.get_input_embeddings().register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        wrapped.merge_experts(MoEPruneConfig(method="mc-smoe", **kwargs), calibration=CALIB)
    assert calls == []


def test_smallest_sketch_and_token_count_are_accepted():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    options = {"alignment_sketch": 1, "alignment_tokens": 1}
    get_method("mc-smoe")(MoEPruneConfig(method="mc-smoe", experts_per_layer=3, method_options=options)).validate(
        wrapped.moe_layers()
    )


def test_switch_merges_with_a_folded_router_and_refuses_a_tied_one():
    """Switch hands its experts a one-hot mask, not top-k indices: a tied router (rows mapped through the
    experts' index) cannot be expressed, the folded default can."""
    wrapped = AutoMoEPruneModelForSeq2SeqLM.from_model(build_tiny_model("switch_transformers"))
    wrapped.progress = False
    with pytest.raises(ValueError, match=r"^Family 'switch_transformers' does not pass top-k indices to its "
                       r"experts, so a tied router cannot be mapped; use router='folded'\.$"):
        wrapped.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=3, method_options={"router": "tied"}),
                              calibration=CALIB)
    wrapped.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=3), calibration=CALIB)
    assert {s["num_experts"] for s in wrapped.summary()} == {3}


# ----------------------------------------------------------------------------------------- frequency tests


def test_frequency_keeps_the_most_routed_experts_like_the_counting_rule():
    """Frequency pruning's reference count (MC-SMoE `compute_all_usages` l.193-219, top-k routed tokens per
    expert) and keep rule (the `n` most used per layer, as MC-SMoE's dominant experts); experts tied at the
    cut may go either way (here ties fall to router-probability mass)."""
    ids = calibration_ids("mixtral-8e")
    wrapped, _, traffic = merged_with_traffic("mixtral-8e", ids, MoEPruneConfig(method="frequency", experts_per_layer=4))
    for entry, (_, logits) in zip(wrapped.record["layers"].values(), traffic.values(), strict=True):
        usage = reference_usage_frequency(logits)
        cut = torch.sort(usage, descending=True).values[3]
        tied = set(torch.nonzero(usage == cut).flatten().tolist())
        expected = set(torch.nonzero(usage > cut).flatten().tolist())
        kept = {group[0] for group in entry["groups"]}
        assert expected <= kept and kept - expected <= tied and len(kept) == 4
