"""Every method on planted structure whose right answer is known and unique.

Each test names the bug it is meant to catch; a method that returns a well-formed but wrong answer (keeps the
least-used experts, the farthest cluster member, ignores activations, picks the worst choice) fails here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, make_unselectable

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.merging import cluster_experts

CALIB = torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(11))


def _kept(wrapped) -> dict[str, list[list[int]]]:
    """Per layer, the original experts behind each surviving expert, from the saved record."""
    return {path: [sorted(g) for g in entry["groups"]] for path, entry in wrapped.record["layers"].items()}


# ------------------------------------------------------------------------------------------ frequency


def test_frequency_keeps_exactly_the_used_experts():
    """Experts 1, 3, 5 are never routed on the calibration batch: keeping 3 of 6 must keep {0, 2, 4}.
    Catches: ranking ascending (keeping the least used), an off-by-one in the argsort slice."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    make_unselectable(wrapped.model, wrapped.moe_layers(), [1, 3, 5], CALIB)
    wrapped.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=CALIB)
    for groups in _kept(wrapped).values():
        assert groups == [[0], [2], [4]]


# ---------------------------------------------------------------------------------------------- STUN


@torch.no_grad()
def _stun_planted():
    """Router rows 0, 1, 2 nearly equal (one cluster); expert weights W1 = B, W0 = B + D, W2 = B - 1.1 D, so
    the weight centroid is B - 0.033 D: nearest is 1, farthest is 2, the first index is 0."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    generator = torch.Generator().manual_seed(3)
    for layer in wrapped.moe_layers():
        router = layer.router_tensors()["weight"]
        for e in (1, 2):
            router[e] = router[0] + 1e-3 * torch.randn(router.shape[1], generator=generator)
        for tensor in layer.expert_tensors().values():
            base, delta = tensor[1].clone(), 0.05 * torch.randn(tensor[1].shape, generator=generator)
            tensor[0] = base + delta
            tensor[2] = base - 1.1 * delta
    return wrapped


def test_stun_keeps_the_member_nearest_the_centroid():
    """Catches: keeping the farthest member, the first (lowest-index) member, or clusters built wrongly."""
    wrapped = _stun_planted()
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4))
    for path, groups in _kept(wrapped).items():
        assert groups == [[1], [3], [4], [5]], path
        assert [0, 1, 2] in wrapped.record["steps"][-1]["details"]["clusters"][path]


@pytest.mark.parametrize("coordinate", [0, 5, 7])
def test_stun_representative_counts_every_slice_of_the_weights(coordinate):
    """Members 0, 1, 2 differ in one coordinate only (0, 10 and 4; the centroid is 4.67), the other expert is
    far away, and slices of 3 elements cover the 8 per expert: the nearest member is 2 wherever the difference
    sits. Catches: a distance that adds the centroid instead of subtracting it, the mean over all elements, a
    slice loop that skips the first element or the tail (an all-zero distance picks the first member)."""
    from hf_moeprune.methods.stun.clustering import pick_representative

    experts = torch.zeros(4, 2, 4)
    experts.view(4, -1)[1, coordinate] = 10.0
    experts.view(4, -1)[2, coordinate] = 4.0
    experts[3] = -100.0
    assert pick_representative([0, 1, 2], [experts], chunk=3) == 2


# --------------------------------------------------------------------------------------- REAP / NAEE


@torch.no_grad()
def _faint_experts(faint=(1, 3)):
    """Experts `faint` produce outputs 1000x smaller than the rest; routing is unchanged."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    for layer in wrapped.moe_layers():
        for e in faint:
            layer.expert_tensors()["down_proj"][e] *= 1e-3
    return wrapped


def test_reap_drops_the_lowest_saliency_experts():
    """Catches: dropping the highest-scoring experts, scores without the output norm."""
    wrapped = _faint_experts()
    wrapped.prune_experts(MoEPruneConfig(method="reap", experts_per_layer=4), calibration=CALIB)
    for groups in _kept(wrapped).values():
        assert groups == [[0], [2], [4], [5]]


def test_naee_drops_the_experts_whose_removal_changes_the_output_least():
    """Experts 1 and 3 are never routed on the calibration batch, so removing them leaves the layer output
    unchanged (error 0) and removing any other expert does not. (Faint experts would not do: their tokens'
    slots go to the next expert, which contributes fully.) Catches: keeping the subset with the largest
    error, the first subset tried, comparing against the wrong reference."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    make_unselectable(wrapped.model, wrapped.moe_layers(), [1, 3], CALIB)
    wrapped.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=4), calibration=CALIB)
    for groups in _kept(wrapped).values():
        assert groups == [[0], [2], [4], [5]]


# -------------------------------------------------------------------------------------------- merging


@torch.no_grad()
def _pairs():
    """Experts 3, 4, 5 are near-copies of 0, 1, 2 (router rows and weights, noise 1e-3): three clear pairs."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    generator = torch.Generator().manual_seed(5)
    for layer in wrapped.moe_layers():
        tensors = [layer.router_tensors()["weight"], *layer.expert_tensors().values()]
        for tensor in tensors:
            for a in (0, 1, 2):
                tensor[a + 3] = tensor[a] + 1e-3 * torch.randn(tensor[a].shape, generator=generator)
    return wrapped


@pytest.mark.parametrize("method", ["uncurl", "hc-smoe"])
def test_merges_group_the_near_identical_experts(method):
    """Catches: clustering on the wrong similarity sign, merging the most dissimilar experts."""
    wrapped = _pairs()
    wrapped.merge_experts(MoEPruneConfig(method=method, experts_per_layer=3), calibration=CALIB)
    for groups in _kept(wrapped).values():
        assert sorted(groups) == [[0, 3], [1, 4], [2, 5]]


def test_mc_smoe_dominant_experts_lead_and_others_join_the_most_similar():
    """MC-SMoE's grouping on planted statistics: the 2 most routed experts (3 and 0) lead; 1 is closest to 3,
    2 closest to 0. Catches: leaders by least frequency, joining the least similar leader."""
    similarity = torch.tensor(
        [
            [1.0, 0.1, 0.9, 0.2],
            [0.1, 1.0, 0.0, 0.8],
            [0.9, 0.0, 1.0, 0.3],
            [0.2, 0.8, 0.3, 1.0],
        ]
    )
    frequency = torch.tensor([30.0, 5.0, 10.0, 40.0])
    groups = cluster_experts(similarity, 2, "dominant", frequency=frequency)
    assert groups == [[0, 2], [3, 1]]  # anchor first, groups ordered by anchor


def test_mc_smoe_end_to_end_merges_into_the_most_used_experts():
    """On the model: experts 1, 3, 5 are never routed, so 0, 2, 4 are dominant and each anchors one group."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    make_unselectable(wrapped.model, wrapped.moe_layers(), [1, 3, 5], CALIB)
    wrapped.merge_experts(MoEPruneConfig(method="mc-smoe", experts_per_layer=3), calibration=CALIB)
    for entry in wrapped.record["steps"][-1]["details"]["layers"].values():
        assert [g[0] for g in entry["groups"]] == [0, 2, 4]


# ------------------------------------------------------------------------------------------ Wanda / OWL


@torch.no_grad()
def _routed_inputs(wrapped, layer, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first MoE block's inputs `[T, H]` on CALIB and which experts each token is routed to `[T, k]`."""
    captured = []
    handle = layer.block.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    wrapped.model(input_ids=CALIB)
    handle.remove()
    x = torch.cat(captured).double()
    logits = x @ layer.router_tensors()["weight"].double().T
    return x, logits.topk(top_k, dim=-1).indices


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is among the round(in * sparsity) lowest scores of its row (scores `[out, in]`)."""
    k = round(score.shape[1] * sparsity)
    order = score.argsort(dim=1)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def test_wanda_mask_follows_the_activations():
    """Layer 0's inputs get feature scales from 0.05 to 5 (its post-attention norm weight), so |W| * ||X||
    and |W| alone give very different masks. The pruned gate/up weights must match the Wanda mask computed
    here from the routed tokens. Catches: magnitude-only scores, norms of all tokens instead of the routed
    ones, pruning the highest scores, norms along the wrong axis."""
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.copy_(torch.logspace(-1.3, 0.7, 64))
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    layer = wrapped.moe_layers()[0]
    x, routed = _routed_inputs(wrapped, layer, top_k=2)
    before = layer.expert_tensors()["gate_up_proj"].detach().clone()  # [E, 2I, H]
    wrapped.prune_experts(MoEPruneConfig(method="wanda", weight_sparsity=0.5), calibration=CALIB)
    after = wrapped.moe_layers()[0].expert_tensors()["gate_up_proj"]
    differs = 0
    for e in range(before.shape[0]):
        tokens = (routed == e).any(dim=1)
        assert tokens.any()
        norm = x[tokens].norm(dim=0)  # ||X_j|| over the tokens routed to e
        weight = before[e].double().abs()
        expected = _row_mask(weight * norm, 0.5)
        assert torch.equal(after[e] == 0, expected), e
        differs += int((expected != _row_mask(weight, 0.5)).sum())
    assert differs > before[:, :, 0].numel()  # the planting matters: magnitude alone gives another mask


def test_owl_gives_the_outlier_heavy_layer_the_lower_sparsity():
    """Layer 1's expert weights get sparse spikes (x40 on 2% of entries): more Wanda scores above M * mean,
    so OWL must prune layer 1 less than layer 0, the two averaging to the target. Catches: the sign of the
    shift flipped (s + (r - mean r)), ratios not rescaled, one sparsity for all layers."""
    model = build_tiny_model("mixtral")
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in (model.model.layers[1].mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.down_proj):
            spikes = torch.rand(param.shape, generator=generator) < 0.02
            param[spikes] *= 40
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    wrapped.prune_experts(
        MoEPruneConfig(method="owl", weight_sparsity=0.5, method_options={"owl_lambda": 0.1}), calibration=CALIB
    )
    details = wrapped.record["steps"][-1]["details"]
    ratios, sparsity = details["outlier_ratios"], details["layer_sparsity"]
    assert ratios["model.layers.1"] > ratios["model.layers.0"]
    # two layers: the ratios rescale to {0, 2 lambda}, so the sparsities are target -+ lambda
    assert sparsity["model.layers.1"] == pytest.approx(0.4, abs=1e-5)
    assert sparsity["model.layers.0"] == pytest.approx(0.6, abs=1e-5)
