"""Expert merging: permutation alignment for every expert layout, clustering, the uncurl / mc-smoe / hc-smoe
pipelines end to end, and reduced checkpoints that reload with identical logits."""

from __future__ import annotations

import copy
import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import LayerStatistics
from hf_moeprune.families import family_for_model_type
from hf_moeprune.methods import get_method
from hf_moeprune.methods.merging import (
    align_groups,
    alignment,
    alignment_score,
    cluster_experts,
    num_units,
    permute_expert_units,
    redundancy_counts,
    solve_assignment,
)
from hf_moeprune.methods.merging.alignment import count_sketch, expert_parameter, unit_weight_features
from hf_moeprune.methods.merging.similarity import expert_features, expert_similarity
from hf_moeprune.moe_layers import find_moe_layers
from hf_moeprune.surgery import LayerPlan, apply_layer_plan

# hidden width 32: the tests feed inputs of that width to single experts
NARROW = {
    "mixtral": dict(hidden_size=32, head_dim=8),
    "gpt_oss": dict(hidden_size=32, head_dim=8),
    "switch_transformers": dict(d_model=32, d_kv=8),
}


def build(model_type: str, seed: int = 0, **overrides):
    model = build_tiny_model(model_type, seed, **{**NARROW[model_type], **overrides})
    with torch.no_grad():  # random, non-degenerate experts and biases whatever the family's init
        for layer in find_moe_layers(model, family_for_model_type(model_type)):
            for tensor in layer.expert_tensor_specs():
                for e in range(layer.num_experts):
                    p = expert_parameter(layer, tensor, e)
                    p.copy_(torch.randn_like(p) * 0.2)
    return model


def first_layer(model):
    return find_moe_layers(model, family_for_model_type(model.config.model_type))[0]


def expert_output(layer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """What one expert computes on `x`, called through the family's own experts module."""
    if layer.spec.expert_layout == "modules":
        return layer.expert_module(expert)(x)
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long)
    return layer.experts(x, index, torch.ones(x.shape[0], 1))


LAYOUTS = ["mixtral", "gpt_oss", "switch_transformers"]  # fused chunk2, fused interleave2, per-expert modules


@pytest.mark.parametrize("model_type", LAYOUTS)
@torch.no_grad()
def test_permuting_units_keeps_the_function(model_type):
    layer = first_layer(build(model_type))
    x = torch.randn(16, 32)
    before = expert_output(layer, 1, x)
    weights_before = {n: t.clone() for n, t in layer.expert_tensors().items()}
    perm = torch.randperm(num_units(layer), generator=torch.Generator().manual_seed(1))
    permute_expert_units(layer, 1, perm)
    torch.testing.assert_close(expert_output(layer, 1, x), before, atol=1e-5, rtol=1e-5)
    changed = [n for n, t in layer.expert_tensors().items() if not torch.equal(t[1], weights_before[n][1])]
    assert changed, "the permutation must move weights"
    assert all(torch.equal(t[0], weights_before[n][0]) for n, t in layer.expert_tensors().items())


def _plant_permuted_copy(layer, source: int, target: int, seed: int = 3) -> torch.Tensor:
    """Make expert `target` an exact hidden-unit permutation of `source`, sharing its router row."""
    for tensor in layer.expert_tensor_specs():
        expert_parameter(layer, tensor, target).copy_(expert_parameter(layer, tensor, source))
    perm = torch.randperm(num_units(layer), generator=torch.Generator().manual_seed(seed))
    permute_expert_units(layer, target, perm)
    for value in layer.router_tensors().values():
        value.data[target] = value.data[source]
    return perm


@pytest.mark.parametrize("model_type", LAYOUTS)
@torch.no_grad()
def test_alignment_recovers_a_planted_permutation(model_type):
    model = build(model_type)
    x = torch.randn(32, 32)
    errors = {}
    for aligned in (True, False):
        layer = first_layer(copy.deepcopy(model))
        _plant_permuted_copy(layer, 0, 1)
        reference = expert_output(layer, 0, x)
        groups = [[0, 1]] + [[e] for e in range(2, layer.num_experts)]
        if aligned:
            reports = align_groups(layer, groups, mode="weights")
            assert reports[0].score_after > reports[0].score_before
        apply_layer_plan(layer, LayerPlan(groups=groups, weights=[[3.0, 1.0]] + [[1.0]] * (len(groups) - 1)))
        assert layer.num_experts == len(groups)
        errors[aligned] = (expert_output(layer, 0, x) - reference).abs().max().item()
    assert errors[True] < 1e-5
    assert errors[False] > 1e-2 > 1000 * errors[True]


@torch.no_grad()
def test_activation_alignment_recovers_a_planted_permutation():
    layer = first_layer(build("mixtral"))
    perm = _plant_permuted_copy(layer, 0, 1)
    reports = align_groups(layer, [[0, 1]], mode="activations", inputs=torch.randn(64, 32))
    assert reports[0].moved_units == len(perm) - int((perm == torch.arange(len(perm))).sum())
    for tensor in layer.expert_tensor_specs():
        torch.testing.assert_close(expert_parameter(layer, tensor, 1), expert_parameter(layer, tensor, 0))


def test_sketched_score_still_recovers_a_noisy_permutation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 3000, generator=g)
    perm = torch.randperm(256, generator=g)
    b = a[perm] + 0.5 * torch.randn(256, 3000, generator=g)
    for solver in ("scipy", "auto"):
        found = solve_assignment(alignment_score(a, b, sketch_dim=512, chunk_rows=100), solver)
        assert np.array_equal(perm.numpy()[found], np.arange(256))


def test_alignment_score_is_the_inner_product_of_unit_features_in_any_chunking():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    exact = (a @ b.T).numpy()
    for chunk_rows in (1, 3, 7, 100):
        np.testing.assert_allclose(alignment_score(a, b, sketch_dim=None, chunk_rows=chunk_rows), exact, rtol=1e-6)
    sketched = (count_sketch(a, 3, seed=4) @ count_sketch(b, 3, seed=4).T).numpy()
    np.testing.assert_allclose(alignment_score(a, b, sketch_dim=3, seed=4), sketched, rtol=1e-6)
    np.testing.assert_allclose(alignment_score(a, b, sketch_dim=5), exact, rtol=1e-6)  # no narrower: exact


@pytest.mark.parametrize(("flop_limit", "sketch_dim", "sketched"), [
    (7 * 7 * 5 - 1, 4, True),  # exact product above the limit, features wider than the sketch
    (7 * 7 * 5, 4, False),  # exactly at the limit
    (0, 5, False),  # features no wider than the sketch
])
def test_auto_sketch_switches_on_above_the_flop_limit_only(monkeypatch, flop_limit, sketch_dim, sketched):
    monkeypatch.setattr(alignment, "SKETCH_AUTO_FLOPS", flop_limit)
    monkeypatch.setattr(alignment, "DEFAULT_SKETCH_DIM", sketch_dim)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = count_sketch(a, 4) @ count_sketch(b, 4).T if sketched else a @ b.T
    np.testing.assert_allclose(alignment_score(a, b), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["lapjv", "scipy", "auto", "auto-without-lap"])
def test_assignment_maximises_the_total_score(monkeypatch, solver):
    """Every solver returns the permutation with the highest total score, found here by trying all 720."""
    if solver == "auto-without-lap":
        monkeypatch.setitem(sys.modules, "lap", None)  # `import lap` raises ImportError: scipy takes over
        solver = "auto"
    score = np.random.default_rng(3).normal(size=(6, 6)).astype(np.float32)
    best = max(itertools.permutations(range(6)), key=lambda p: score[np.arange(6), list(p)].sum())
    assert solve_assignment(score, solver).tolist() == list(best) == solve_assignment(score).tolist()
    with pytest.raises(ValueError, match="Unknown assignment solver 'hungarian'"):
        solve_assignment(score, "hungarian")


@torch.no_grad()
def test_alignment_report_gives_the_identity_and_the_best_score():
    layer = first_layer(build("mixtral"))
    features = [unit_weight_features(layer, e) for e in (0, 1)]
    score = alignment_score(*features)
    (report,) = align_groups(layer, [[0, 1], [2]], mode="weights", solver="scipy")
    perm = solve_assignment(score, "scipy")
    assert (report.anchor, report.member) == (0, 1)
    assert report.score_before == pytest.approx(float(np.trace(score)))
    assert report.score_after == pytest.approx(float(score[np.arange(len(perm)), perm].sum()))
    assert report.moved_units == int((perm != np.arange(len(perm))).sum()) > 0


def _planted_similarity(groups, num, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(groups), 20))
    features = np.zeros((num, 20))
    for g, members in enumerate(groups):
        for e in members:
            features[e] = centres[g] + noise * rng.normal(size=20)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return torch.from_numpy(unit @ unit.T), torch.from_numpy(features)


@pytest.mark.parametrize("method", ["spectral", "kmeans", "agglomerative", "dominant"])
def test_clustering_finds_planted_groups(method):
    planted = [[0, 3, 6], [1, 4], [2, 5, 7]]
    similarity, features = _planted_similarity(planted, 8)
    frequency = torch.tensor([9.0, 8, 7, 1, 2, 3, 1, 1])  # one most-used expert per group: the anchors
    groups = cluster_experts(similarity, 3, method, frequency=frequency, features=features, seed=0)
    assert sorted(sorted(g) for g in groups) == sorted(planted)
    assert [g[0] for g in groups] == [0, 1, 2]  # anchor (most frequent) first
    assert groups == cluster_experts(similarity, 3, method, frequency=frequency, features=features, seed=0)


@pytest.mark.parametrize("linkage_method", ["average", "complete", "single"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_agglomerative_on_a_similarity_equals_scipy_on_one_minus_it(linkage_method, k):
    """Without features, agglomerative clustering cuts the `linkage_method` tree of 1 - similarity at k
    clusters: the same partition as scipy's `linkage` + `fcluster(maxclust=k)` (random data, no ties)."""
    features = np.random.default_rng(k).normal(size=(8, 4))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = torch.from_numpy(unit @ unit.T)
    distance = 1.0 - similarity.numpy()
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), linkage_method), k, "maxclust")
    expected = sorted(sorted(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels))
    groups = cluster_experts(similarity, k, "agglomerative", frequency=torch.ones(8), linkage=linkage_method)
    assert sorted(sorted(g) for g in groups) == expected


def test_ward_linkage_without_features_is_refused_by_name():
    with pytest.raises(ValueError, match="Ward linkage needs expert features, not a similarity"):
        cluster_experts(torch.eye(4, dtype=torch.float64), 2, "agglomerative", frequency=torch.ones(4),
                        linkage="ward")


def test_dominant_experts_lead_and_the_rest_join_their_most_similar_leader():
    """MC-SMoE's grouping: the k most used experts lead; every other expert joins the leader it is most
    similar to, even where a non-leader is more similar still."""
    similarity = torch.eye(5, dtype=torch.float64)
    for a, b, value in [(2, 0, 0.6), (2, 4, 0.5), (3, 4, 0.7), (3, 2, 0.9), (1, 0, 0.1), (1, 4, 0.2)]:
        similarity[a, b] = similarity[b, a] = value
    groups = cluster_experts(similarity, 2, "dominant", frequency=torch.tensor([9.0, 1, 2, 3, 8]))
    assert groups == [[0, 2], [4, 1, 3]]


@pytest.mark.parametrize("method", ["spectral", "kmeans", "agglomerative"])
def test_identical_experts_still_give_k_nonempty_groups(method):
    similarity = torch.ones(6, 6, dtype=torch.float64)
    groups = cluster_experts(
        similarity, 4, method, frequency=torch.ones(6), features=torch.ones(6, 5), seed=0
    )
    assert len(groups) == 4 and all(groups) and sorted(sum(groups, [])) == list(range(6))


def test_adaptive_counts_follow_redundancy():
    redundant, _ = _planted_similarity([[0, 1, 2, 3], [4, 5, 6, 7]], 8, noise=0.01)
    diverse, _ = _planted_similarity([[e] for e in range(8)], 8, seed=1)
    counts = redundancy_counts({"a": redundant, "b": diverse}, budget=10, floors={"a": 2, "b": 2})
    assert counts == {"a": 2, "b": 8}


def _upgma_heights(distance: np.ndarray) -> list[float]:
    """Average-linkage merge heights by the definition: repeatedly join the two clusters whose members' mean
    pairwise distance is smallest (the reference the scipy-based rule must agree with)."""
    clusters = [[i] for i in range(len(distance))]
    heights = []
    while len(clusters) > 1:
        pairs = [(a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        mean = {(a, b): distance[np.ix_(clusters[a], clusters[b])].mean() for a, b in pairs}
        a, b = min(mean, key=mean.get)
        heights.append(float(mean[(a, b)]))
        clusters = [c for i, c in enumerate(clusters) if i not in (a, b)] + [clusters[a] + clusters[b]]
    return heights


@pytest.mark.parametrize("budget", [19, 15, 12, 9])
def test_adaptive_counts_take_the_cheapest_average_linkage_merges_over_all_layers(budget):
    """Removing m experts from a layer costs its m-th average-linkage height on 1 - similarity; the budget takes
    the globally cheapest removals (random similarities: no ties, single or complete linkage would differ)."""
    floors = {"a": 2, "b": 1, "c": 3}
    similarities = {}
    for seed, path in enumerate(floors):
        features = np.random.default_rng(seed).normal(size=(7, 5))
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        similarities[path] = torch.from_numpy(unit @ unit.T)
    costs = sorted(
        (height, path)
        for path, sim in similarities.items()
        for height in _upgma_heights(1.0 - sim.numpy())[: 7 - floors[path]]
    )
    removed = [path for _, path in costs[: 21 - budget]]
    expected = {path: 7 - removed.count(path) for path in floors}
    assert redundancy_counts(similarities, budget, floors) == expected


def test_adaptive_counts_stop_at_every_layers_floor():
    similarities = {path: _planted_similarity([[e] for e in range(6)], 6, seed=s)[0] for s, path in enumerate("ab")}
    floors = {"a": 2, "b": 3}
    assert redundancy_counts(similarities, 5, floors) == floors
    with pytest.raises(ValueError, match="budget of 4 experts leaves some layer below its top-k"):
        redundancy_counts(similarities, 4, floors)


def test_count_sketch_adds_each_column_with_a_sign_to_one_bucket():
    """Each input column lands in exactly one of the `dim` buckets with sign +-1: sketching the identity shows
    the map; every bucket and both signs are used, and the sketch is linear (rows sketch independently)."""
    width, dim = 400, 8
    sketch = count_sketch(torch.eye(width), dim, seed=3)
    assert sketch.shape == (width, dim) and sketch.dtype == torch.float32
    assert ((sketch != 0).sum(1) == 1).all()
    assert set(sketch[sketch != 0].tolist()) == {-1.0, 1.0}
    assert ((sketch != 0).sum(0) > 0).all()
    features = torch.randn(3, width)
    torch.testing.assert_close(count_sketch(features, dim, seed=3), features @ sketch)


def _tokens(seed=0, n=8, length=24):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def _saved_bytes(folder) -> int:
    """Bytes of tensor data in a checkpoint's safetensors files (the JSON headers excluded)."""
    from safetensors.torch import load_file

    return sum(
        t.numel() * t.element_size() for f in folder.glob("*.safetensors") for t in load_file(f).values()
    )


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """The tiny Mixtral and the size of its unreduced checkpoint, built once for the round-trip tests."""
    base = build("mixtral")
    folder = tmp_path_factory.mktemp("base")
    AutoMoEPruneModelForCausalLM.from_model(copy.deepcopy(base)).save_pretrained(folder)
    return base, _saved_bytes(folder)


@pytest.mark.parametrize("method", ["uncurl", "mc-smoe", "hc-smoe"])
def test_merge_reloads_with_identical_logits_and_a_smaller_file(method, saved_base, tmp_path):
    base, base_bytes = saved_base
    wrapped = AutoMoEPruneModelForCausalLM.from_model(copy.deepcopy(base))
    wrapped.merge_experts(MoEPruneConfig(method=method, experts_per_layer=3), calibration=_tokens())
    wrapped.save_pretrained(tmp_path / "merged")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "merged")
    probe = _tokens(seed=1, n=2)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=probe).logits, wrapped(input_ids=probe).logits, atol=0, rtol=0
        )
    assert [s["num_experts"] for s in reloaded.summary()] == [3, 3]
    layer = first_layer(base)
    per_expert = sum(t[0].numel() * t.element_size() for t in layer.expert_tensors().values())
    per_expert += layer.router_tensors()["weight"][0].numel() * 4
    removed = 2 * 3 * per_expert  # 2 layers, 6 -> 3 experts
    assert base_bytes - _saved_bytes(tmp_path / "merged") == removed


@torch.no_grad()
def test_uncurl_merges_planted_permuted_duplicates_without_changing_the_model(tmp_path):
    model = build("mixtral", num_local_experts=8, num_experts_per_tok=1)
    layers = find_moe_layers(model, family_for_model_type("mixtral"))
    for layer in layers:
        for source in range(4):
            _plant_permuted_copy(layer, source, source + 4, seed=source)
    probe = _tokens(seed=1, n=2)
    before = model(input_ids=probe).logits
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    wrapped.merge_experts(MoEPruneConfig(method="uncurl", experts_per_layer=4), calibration=_tokens())
    step = wrapped.record["steps"][-1]["details"]
    for entry in step["layers"].values():
        assert sorted(sorted(g) for g in entry["groups"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    torch.testing.assert_close(wrapped(input_ids=probe).logits, before, atol=1e-4, rtol=1e-4)


def test_adaptive_merge_saves_a_non_uniform_checkpoint_that_reloads(tmp_path):
    model = build("mixtral", num_local_experts=8, num_experts_per_tok=1)
    layers = find_moe_layers(model, family_for_model_type("mixtral"))
    with torch.no_grad():
        for source in range(4):  # layer 0 is redundant (duplicates), layer 1 is not
            _plant_permuted_copy(layers[0], source, source + 4, seed=source)
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    config = MoEPruneConfig(method="uncurl", num_experts_total=12, adaptive=True)
    wrapped.merge_experts(config, calibration=_tokens())
    counts = [s["num_experts"] for s in wrapped.summary()]
    assert sum(counts) == 12 and counts[0] < counts[1]
    wrapped.save_pretrained(tmp_path / "adaptive")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "adaptive")
    probe = _tokens(seed=1, n=2)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=probe).logits, wrapped(input_ids=probe).logits, atol=0, rtol=0
        )


def test_bad_options_fail_before_calibration():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build("mixtral"))
    with pytest.raises(ValueError, match="Unknown option"):
        wrapped.merge_experts(
            MoEPruneConfig(method="uncurl", experts_per_layer=3, method_options={"bogus": 1})
        )
    with pytest.raises(ValueError, match="clustering"):
        wrapped.merge_experts(
            MoEPruneConfig(method="uncurl", experts_per_layer=3, method_options={"clustering": "x"})
        )
    with pytest.raises(ValueError, match="top-k"):
        wrapped.merge_experts(MoEPruneConfig(method="uncurl", experts_per_layer=1))


@pytest.mark.parametrize(("kind", "expected"), [
    ("frequency", [3.0, 1.0]), ("prob-mass", [0.5, 0.25]), ("uniform", [1.0, 1.0]),
])
def test_merge_weights_follow_the_option(kind, expected):
    """Members are averaged by routed tokens, router-probability mass or equally; a group no token reached
    falls back to equal weights."""
    config = MoEPruneConfig(method="uncurl", experts_per_layer=2, method_options={"merge_weights": kind})
    method = get_method("uncurl")(config)
    stats = SimpleNamespace(counts=torch.tensor([3.0, 0.0, 1.0]), prob_mass=torch.tensor([0.5, 0.0, 0.25]))
    assert method.merge_weights(stats, [0, 2]) == expected
    assert method.merge_weights(stats, [1]) == [1.0]


def test_similarities_and_features_follow_their_definitions():
    """Router-logit cosine and Pearson correlation of the logit columns, cosine of mean outputs (all-token
    means when given, else routed-token means); features: logit profiles, standardised for correlation."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=generator) + torch.tensor([3.0, -1.0, 0.5, 2.0])  # non-zero means
    stats = LayerStatistics(num_experts=4, hidden_size=3, intermediate_size=2)
    stats.record_router(logits)
    stats.output_sum = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    stats.counts = torch.tensor([2.0, 1.0, 4.0, 3.0], dtype=torch.float64)

    def cosine(rows: torch.Tensor) -> torch.Tensor:
        unit = rows.double() / rows.double().norm(dim=1, keepdim=True)
        return unit @ unit.T

    float32 = dict(rtol=1e-6, atol=1e-6)  # the logit Gram matrix and the profiles are accumulated in float32
    torch.testing.assert_close(expert_similarity(stats, "router-logits"), cosine(logits.T), **float32)
    correlation = torch.from_numpy(np.corrcoef(logits.T.double().numpy()))
    torch.testing.assert_close(expert_similarity(stats, "router-correlation"), correlation, **float32)
    routed_means = stats.output_sum / stats.counts.unsqueeze(1)
    torch.testing.assert_close(expert_similarity(stats, "expert-output"), cosine(routed_means))
    all_token_means = torch.randn(4, 3, generator=generator)
    torch.testing.assert_close(expert_similarity(stats, "expert-output", all_token_means), cosine(all_token_means))

    torch.testing.assert_close(expert_features(stats, "router-logits"), logits.T)
    standardised = expert_features(stats, "router-correlation")
    torch.testing.assert_close(standardised.double() @ standardised.double().T, correlation, **float32)
    torch.testing.assert_close(expert_features(stats, "expert-output"), routed_means.float())
    torch.testing.assert_close(expert_features(stats, "expert-output", all_token_means), all_token_means)


def test_groups_short_of_k_split_the_least_similar_member_off_the_largest_group():
    """Clusterers may return fewer groups than asked (identical experts). Ties between equal largest groups go to
    the lowest anchor; ties between equally dissimilar members to the highest index."""
    from hf_moeprune.methods.merging.clustering import _repair_to_k

    sim = np.full((8, 8), 0.5)
    np.fill_diagonal(sim, 1.0)
    for (a, b), value in {(3, 1): 0.9, (3, 2): 0.2, (3, 5): 0.2, (1, 2): 0.0, (4, 0): 0.1}.items():
        sim[a, b] = sim[b, a] = value
    freq = np.array([0.1, 0.1, 0.1, 0.5, 0.6, 0.1, 0.1, 0.1])
    groups = [[4, 0, 6, 7], [3, 1, 2, 5]]
    assert _repair_to_k(groups, 3, sim, freq) == [[4, 0, 6, 7], [3, 1, 2], [5]]
    assert _repair_to_k(groups, 4, sim, freq) == [[4, 6, 7], [3, 1, 2], [5], [0]]
    assert groups == [[4, 0, 6, 7], [3, 1, 2, 5]]  # the caller's groups are left as they were
    with pytest.raises(RuntimeError, match=r"^Clustering returned 2 groups, more than the 1 asked for\.$"):
        _repair_to_k(groups, 1, sim, freq)
