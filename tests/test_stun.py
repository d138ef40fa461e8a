"""STUN: planted duplicates, global threshold (non-uniform counts that load), data-free run, phase 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.stun import Dendrogram, global_threshold_counts, router_distance

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _planted(duplicates: dict[int, list[tuple[int, int]]], top_k: int = 1):
    """Tiny Mixtral (6 experts, 2 layers) with widely spread router rows and planted duplicate experts:
    `duplicates[layer] = [(original, copy), ...]` copies router row and weights."""
    model = build_tiny_model("mixtral", num_experts_per_tok=top_k)
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    for index, layer in enumerate(wrapped.moe_layers()):
        router = layer.router_tensors()["weight"]
        router.normal_(0, 1.0)  # distinct experts far apart
        for original, copy in duplicates.get(index, []):
            router[copy] = router[original]
            for tensor in layer.expert_tensors().values():
                tensor[copy] = tensor[original]
    return wrapped


def _kept(wrapped) -> dict[str, list[int]]:
    return {path: [g[0] for g in entry["groups"]] for path, entry in wrapped.record["layers"].items()}


def test_planted_duplicate_removed_and_logits_barely_move():
    wrapped = _planted({0: [(0, 1)], 1: [(2, 4)]})
    before = logits_of(wrapped.model, IDS)
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=10))
    kept = _kept(wrapped)
    assert len(kept["model.layers.0.mlp"]) == 5 and {2, 3, 4, 5} <= set(kept["model.layers.0.mlp"])
    assert len(kept["model.layers.1.mlp"]) == 5 and {0, 1, 3, 5} <= set(kept["model.layers.1.mlp"])
    torch.testing.assert_close(logits_of(wrapped.model, IDS), before, atol=1e-4, rtol=1e-4)


def test_global_threshold_gives_non_uniform_counts_that_load(tmp_path):
    wrapped = _planted({0: [(0, 1), (3, 5)]})
    before = logits_of(wrapped.model, IDS)
    wrapped.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=2 / 12))
    assert [s["num_experts"] for s in wrapped.summary()] == [4, 6]  # only the redundant layer loses experts
    assert {2, 4} <= set(_kept(wrapped)["model.layers.0.mlp"])
    after = logits_of(wrapped.model, IDS)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    wrapped.save_pretrained(tmp_path / "stun")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "stun")
    assert [s["num_experts"] for s in reloaded.summary()] == [4, 6]
    torch.testing.assert_close(logits_of(reloaded.model, IDS), after)


@pytest.mark.parametrize("merge_method", ["greedy_but_reject_mixed", "complete"])
def test_a_layer_the_threshold_leaves_whole_does_not_stop_the_later_layers(merge_method):
    wrapped = _planted({1: [(0, 1), (3, 5)]})
    options = {"merge_method": merge_method}
    wrapped.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=2 / 12, method_options=options))
    assert [s["num_experts"] for s in wrapped.summary()] == [6, 4]
    assert {2, 4} <= set(_kept(wrapped)["model.layers.1.mlp"])


def test_merge_max_clusters_averages_every_cluster_of_each_layer_at_the_limit():
    """`merge_max_clusters=4` and 4 clusters per layer: both layers average their clusters (the reference's
    `len(expert_pairs_list) > merge_max_clusters` picks representatives only above the limit)."""
    wrapped = _planted({0: [(0, 1)], 1: [(2, 4)]})
    options = {"merge_max_clusters": 4}
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4, method_options=options))
    clusters = wrapped.record["steps"][-1]["details"]["clusters"]
    assert set(clusters) == set(wrapped.record["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for path, entry in wrapped.record["layers"].items():
        assert entry["groups"] == clusters[path] and max(map(len, clusters[path])) > 1, path


@torch.no_grad()
@pytest.mark.parametrize(("representative", "kept"), [("centroid", 1), ("router", 2)])
def test_representative_is_the_member_nearest_the_centroid_of_its_features(representative, kept):
    """Experts 0-2 form one cluster: their router rows are c - e, c + e, c (expert 2 nearest the rows' centroid),
    their weights w, w + 2d, w + 10d (expert 1 nearest the weights' centroid w + 4d)."""
    wrapped = _planted({})
    layer = wrapped.moe_layers()[0]
    router = layer.router_tensors()["weight"]
    offset = 1e-3 * torch.randn(router.shape[1], generator=torch.Generator().manual_seed(0))
    router[0], router[1], router[2] = router[2] - offset, router[2] + offset, router[2]
    for tensor in layer.expert_tensors().values():
        step = 0.01 * torch.randn_like(tensor[0])
        tensor[1], tensor[2] = tensor[0] + 2 * step, tensor[0] + 10 * step
    options = {"representative": representative}
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4, method_options=options))
    assert wrapped.record["steps"][-1]["details"]["clusters"]["model.layers.0.mlp"][0] == [0, 1, 2]
    assert _kept(wrapped)["model.layers.0.mlp"] == [kept, 3, 4, 5]


@pytest.mark.parametrize("seed", range(20))
def test_a_cluster_of_two_keeps_its_first_member(seed):
    """Two members are equidistant from their midpoint; rounding must not pick the second (the docstring's rule)."""
    from hf_moeprune.methods.stun.clustering import pick_representative

    experts = torch.randn(6, 300, generator=torch.Generator().manual_seed(seed))
    assert pick_representative([2, 5], [experts]) == 2
    assert pick_representative([5, 2], [experts]) == 5


def test_router_variant_runs_no_forward_pass():
    wrapped = _planted({0: [(0, 1)]})
    calls = []
    handles = [wrapped.model.register_forward_pre_hook(lambda *a: calls.append("model"))]
    handles += [
        layer.register_forward_pre_hook(lambda *a: calls.append("layer"))
        for layer in wrapped.model.model.layers
    ]
    wrapped.prune_experts(MoEPruneConfig(method="stun", expert_sparsity=0.25), calibration=None)
    for handle in handles:
        handle.remove()
    assert calls == []
    step = wrapped.record["steps"][-1]
    assert step["forward_passes"] == 0 and step["calibration"] is None
    assert sum(s["num_experts"] for s in wrapped.summary()) == 9


def test_two_phases_owl_inside_surviving_experts():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    wrapped.prune_experts(
        MoEPruneConfig(method="stun", expert_sparsity=0.25, weight_sparsity=0.5, unstructured="owl"),
        calibration=CALIB,
        batch_size=2,
    )
    record = wrapped.record
    assert sum(s["num_experts"] for s in wrapped.summary()) == 9
    step = record["steps"][-1]
    assert step["forward_passes"] == 4  # OWL: outlier sweep + pruning sweep, 2 batches each
    phase2 = step["details"]["unstructured"]
    assert phase2["algorithm"] == "owl"
    # OWL rescales the layers' outlier shares to a spread of 2 * lambda (0.16) and shifts them so that their plain
    # mean is the target (the authors' rule, luuyin/OWL; owl_balance="size_weighted" weights by layer size);
    # the recorded ratios are rounded to 5 decimals.
    layers = wrapped.moe_layers()
    ratios = {layer.path: phase2["layer_sparsity"][layer.path.rsplit(".", 1)[0]] for layer in layers}
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(2 * 0.08, abs=2e-5)
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.5, abs=1e-5)
    for layer in layers:
        for spec in layer.expert_tensor_specs():
            w = layer.expert_tensors()[spec.name]
            assert w.shape[0] == layer.num_experts
            # every output row of every expert loses round(N * ratio) of its N inputs, no more, no fewer
            n_inputs = w.shape[spec.in_axis + 1]
            share = float((w == 0).double().mean())
            assert share == round(n_inputs * ratios[layer.path]) / n_inputs, spec.name
            assert record["weight_sparsity"][f"{layer.path}.experts.{spec.name}"] == share


@pytest.mark.parametrize("distance", ["coactivation", "mix"])
def test_calibrated_distances(distance):
    wrapped = _planted({0: [(0, 1)]}, top_k=2)
    method_options = {"distance": distance, "average_clusters_up_to": 2}
    wrapped.prune_experts(
        MoEPruneConfig(method="stun", experts_per_layer=5, method_options=method_options), calibration=CALIB
    )
    assert [s["num_experts"] for s in wrapped.summary()] == [5, 5]
    assert wrapped.record["steps"][-1]["forward_passes"] == 1
    # one pair averaged per layer (clusters of two are merged, not represented)
    assert all(sum(len(g) == 2 for g in e["groups"]) == 1 for e in wrapped.record["layers"].values())


def test_threshold_bisection_exact_with_ties():
    rng = np.random.default_rng(0)
    dendrograms = {
        f"l{i}": Dendrogram.from_distance(router_distance(torch.from_numpy(rng.normal(size=(8, 16)))))
        for i in range(3)
    }
    tie = Dendrogram.from_distance(torch.zeros(4, 4))  # every merge at height 0
    dendrograms["tie"] = tie
    floors = dict.fromkeys(dendrograms, 2)
    for target in range(8, 28):
        counts, threshold = global_threshold_counts(dendrograms, floors, target)
        assert sum(counts.values()) == target and all(c >= 2 for c in counts.values())
        # one global threshold: layers cut strictly below it are exactly the merges under it
        for path, d in dendrograms.items():
            assert d.count_at(threshold, 2) <= counts[path] <= d.count_at(np.nextafter(threshold, -1), 2)
    with pytest.raises(ValueError, match="floors"):
        global_threshold_counts(dendrograms, floors, 7)


def test_stun_validates_before_calibration():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    with pytest.raises(ValueError, match="top-k"):
        wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=3))
    with pytest.raises(ValueError, match="distance"):
        wrapped.prune_experts(
            MoEPruneConfig(method="stun", experts_per_layer=4, method_options={"distance": "cos"})
        )
    with pytest.raises(ValueError, match="weight_sparsity"):
        wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4, unstructured="owl"))


@pytest.mark.parametrize("seed", range(6))
def test_complete_linkage_clusters_match_scipy_cut_at_each_count(seed):
    """`merge_method="complete"`: heights and clusters are scipy's complete linkage of the point distances,
    cut into each number of clusters (fcluster's maxclust)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    points = np.random.default_rng(seed).normal(size=(7, 5))
    expected = linkage(pdist(points), method="complete")
    dendrogram = Dendrogram.from_distance(torch.cdist(torch.from_numpy(points), torch.from_numpy(points)))
    np.testing.assert_allclose(dendrogram.heights, expected[:, 2], rtol=1e-12)
    for count in range(1, 8):
        labels = fcluster(expected, count, criterion="maxclust")
        groups = sorted(sorted(np.flatnonzero(labels == label).tolist()) for label in set(labels))
        assert dendrogram.clusters(count) == groups


def test_threshold_ties_spread_over_layers_still_total_the_target():
    """Merges at one height in several layers are taken in layer order until the total is met exactly."""
    tied = {f"l{i}": Dendrogram.from_distance(torch.zeros(4, 4)) for i in range(3)}
    floors = dict.fromkeys(tied, 1)
    for target in range(3, 13):
        counts, _ = global_threshold_counts(tied, floors, target)
        assert sum(counts.values()) == target
        assert list(counts.values()) == sorted(counts.values())  # earlier layers give up experts first


def test_uniform_complete_linkage_records_each_layer_merge_height():
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    wrapped = _planted({0: [(0, 1)]}, top_k=2)
    routers = [layer.router_tensors()["weight"].detach().clone() for layer in wrapped.moe_layers()]
    options = {"merge_method": "complete"}
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4, method_options=options))
    recorded = wrapped.record["steps"][-1]["details"]["threshold"]
    for router, (path, height) in zip(routers, recorded.items(), strict=True):
        d = router_distance(router).double().numpy()
        heights = linkage(squareform((d + d.T) / 2, checks=False), method="complete")[:, 2]
        assert height == pytest.approx(heights[6 - 4 - 1]), path  # the second of the two merges


def test_global_complete_linkage_counts_and_threshold_are_the_bisection_of_the_layers_dendrograms():
    wrapped = _planted({0: [(0, 1), (3, 5)]}, top_k=2)
    dendrograms = {layer.path: Dendrogram.from_distance(router_distance(layer.router_tensors()["weight"]))
                   for layer in wrapped.moe_layers()}
    counts, threshold = global_threshold_counts(dendrograms, dict.fromkeys(dendrograms, 2), 9)
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=9, method_options={"merge_method": "complete"}))
    details = wrapped.record["steps"][-1]["details"]
    assert details["counts"] == counts and details["threshold"] == threshold
    assert [s["num_experts"] for s in wrapped.summary()] == list(counts.values())


def test_stun_options_refuse_negative_merge_caps_and_greedy_options_on_complete_linkage():
    from hf_moeprune.methods.stun import STUNOptions

    assert STUNOptions(top_k=0).top_k == 0  # no merge allowed is a valid cap
    with pytest.raises(ValueError, match=r"^STUN top_k \(merges allowed per layer\) must be at least 0, got -1\.$"):
        STUNOptions(top_k=-1)
    message = r"^STUN top_k and merge_max_clusters belong to merge_method='greedy_but_reject_mixed'\.$"
    for options in ({"top_k": 2}, {"merge_max_clusters": 2}):
        with pytest.raises(ValueError, match=message):
            STUNOptions(merge_method="complete", **options)
        STUNOptions(**options)
