"""STUN against its reference on what issue #12 added: per-group budgets under group-limited routing, phase 2
over every linear of the decoder layer (routers included, as `OWL/lib/prune_all.py` `find_layers`),
`uniform=True`, and the warning for layers left with exactly top-k experts."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, VOCAB, build_tiny_model, logits_of
from test_reference_defaults import reference_select_expert_pairs
from test_streaming import CALIB as STREAMING_CALIB  # what `in_memory` calibrates with
from test_streaming import assert_same_checkpoint, in_memory, sharded_checkpoint
from transformers import AutoModelForCausalLM

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.config import MoEPruneConfig
from hf_moeprune.methods.unstructured import row_prune_mask
from hf_moeprune.pipeline.streaming import reduce_checkpoint

CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]  # tiny DeepSeek-V3: 8 experts in 2 routing groups, 2 MoE layers


@torch.no_grad()
def _grouped(seed: int = 0) -> AutoMoEPruneModelForCausalLM:
    """Tiny DeepSeek-V3 with n_group=2; router rows spread apart, with near pairs planted inside each group
    (tighter in group 0 of layer 1, so the groups merge different amounts under one threshold)."""
    wrapped = AutoMoEPruneModelForCausalLM.from_model(
        build_tiny_model("deepseek_v3", seed=seed, n_routed_experts=8, n_group=2, topk_group=1)
    )
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(wrapped.moe_layers()):
        router = layer.router_tensors()["weight"]
        router.normal_(0, 1.0, generator=generator)
        for leader, member, spread in ((0, 1, 0.02 * (1 + index)), (2, 3, 0.3), (4, 5, 0.1), (6, 7, 0.6)):
            router[member] = router[leader] + spread * torch.randn(router.shape[1], generator=generator)
    return wrapped


def _routers(wrapped) -> list[torch.Tensor]:
    return [layer.router_tensors()["weight"].detach().clone() for layer in wrapped.moe_layers()]


def _clusters(wrapped) -> list[set[tuple[int, ...]]]:
    return [{tuple(c) for c in clusters} for clusters in wrapped.record["steps"][-1]["details"]["clusters"].values()]


def reference_per_group(gate: torch.Tensor, threshold: float, max_merges: int) -> set[tuple[int, ...]]:
    """The reference's `select_expert_pairs` on each routing group, every group then cut to the count of the
    group that merged least (the documented rule for equal groups). The reference divides distances by the
    whole router's norm, so a group's threshold is scaled by it instead."""
    scaled = threshold * float(torch.norm(gate.float()))
    found = [reference_select_expert_pairs(gate[g], max_merges, scaled, division_by_norm=False) for g in GROUPS]
    share = max(len(c) for c in found)
    clusters = set()
    for members, group_clusters in zip(GROUPS, found, strict=True):
        if len(group_clusters) < share:
            group_clusters = reference_select_expert_pairs(gate[members], len(members) - share, scaled, False)
        clusters |= {tuple(members[i] for i in c) for c in group_clusters}
    return clusters


def _assert_equal_groups_and_reload(wrapped, tmp_path) -> None:
    for entry in wrapped.record["layers"].values():
        owners = [sorted({index // 4 for index in group}) for group in entry["groups"]]
        assert all(len(o) == 1 for o in owners) and owners == sorted(owners)
        counts = [sum(o == [g] for o in owners) for g in (0, 1)]
        assert counts[0] == counts[1] >= 2, entry["groups"]
    logits = logits_of(wrapped.model, IDS)
    wrapped.save_pretrained(tmp_path / "out")
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits_of(reloaded.model, IDS), logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- group-limited routing


def test_uniform_counts_cluster_each_group_as_the_reference(tmp_path):
    wrapped = _grouped()
    gates = _routers(wrapped)
    wrapped.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4))
    # --threshold inf, a cap of 2 merges per group: the reference's default mode inside each group
    assert _clusters(wrapped) == [reference_per_group(g, float("inf"), 2) for g in gates]
    assert [s["num_experts"] for s in wrapped.summary()] == [4, 4]
    _assert_equal_groups_and_reload(wrapped, tmp_path)


@pytest.mark.parametrize("total", [10, 12])
def test_global_threshold_keeps_equal_groups_and_matches_the_reference(total, tmp_path):
    wrapped = _grouped()
    gates = _routers(wrapped)
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=total))
    threshold = wrapped.record["steps"][-1]["details"]["threshold"]
    # the default cap keeps top-k (2) and 2 experts per group: 2 merges per group of 4
    assert _clusters(wrapped) == [reference_per_group(g, threshold, 2) for g in gates]
    counts = [s["num_experts"] for s in wrapped.summary()]
    assert sum(counts) == total and all(c % 2 == 0 for c in counts)
    _assert_equal_groups_and_reload(wrapped, tmp_path)


def test_complete_linkage_keeps_equal_groups(tmp_path):
    wrapped = _grouped()
    wrapped.prune_experts(
        MoEPruneConfig(method="stun", num_experts_total=12, method_options={"merge_method": "complete"})
    )
    assert sum(s["num_experts"] for s in wrapped.summary()) == 12
    _assert_equal_groups_and_reload(wrapped, tmp_path)


def test_a_total_that_cannot_split_into_equal_groups_is_refused_before_any_work():
    wrapped = _grouped()
    with pytest.raises(ValueError, match=r"n_group=2: experts 0-3, 4-7 in every layer\); choose a multiple of 2"):
        wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=11, weight_sparsity=0.5),
                              calibration=None)
    assert [s["num_experts"] for s in wrapped.summary()] == [8, 8]


def test_grouped_stun_with_phase2_streams_to_the_in_memory_result(tmp_path):
    source = sharded_checkpoint(tmp_path / "in", "deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    config = MoEPruneConfig(method="stun", num_experts_total=12, weight_sparsity=0.4)  # OWL over every linear
    reduce_checkpoint(source, tmp_path / "streamed", config, calibration=STREAMING_CALIB, progress=False)
    assert_same_checkpoint(in_memory(source, tmp_path / "memory", config), tmp_path / "streamed")


# --------------------------------------------------------------------------------- phase 2 scope


def _zero_share(tensor: torch.Tensor) -> float:
    return float((tensor == 0).double().mean())


@torch.no_grad()
def test_phase2_prunes_every_linear_and_the_router_by_the_reference_score():
    recipe = dict(method="stun", experts_per_layer=4, weight_sparsity=0.5, unstructured="wanda")
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    phase1 = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    phase1.prune_experts(MoEPruneConfig(method="stun", experts_per_layer=4))
    # the reference hooks every linear of the layer, then prunes: the router's ||X_j|| is over all tokens
    # reaching layer 0's router on the model as phase 1 left it
    seen = []
    handle = phase1.moe_layers()[0].router.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    for batch in CALIB.split(2):
        phase1.model(batch)
    handle.remove()
    norm = torch.cat(seen).float().pow(2).sum(0).sqrt()
    router = phase1.moe_layers()[0].router_tensors()["weight"]
    expected = row_prune_mask(router.abs().float() * norm, 0.5, 1)

    wrapped.prune_experts(MoEPruneConfig(**recipe), calibration=CALIB, batch_size=2)
    pruned_router = wrapped.moe_layers()[0].router_tensors()["weight"]
    assert torch.equal(pruned_router == 0, expected)
    for name, param in wrapped.model.named_parameters():
        if ".layers." in name and param.dim() >= 2:  # attention, routers and experts: half of every row
            assert _zero_share(param) == 0.5, name
    assert _zero_share(wrapped.model.model.embed_tokens.weight) == 0.0
    assert _zero_share(wrapped.model.lm_head.weight) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_router_target_prunes_every_family_router_and_nothing_else(family):
    """Routers are modules of their own in transformers 5 (nn.Linear only in phimoe and switch): the router
    kind reaches each, with half of every row zeroed, and leaves every other weight alone."""
    model = build_tiny_model(family)
    wrapped = AutoMoEPruneModelForCausalLM.from_model(model)
    routers = {id(layer.router_tensors()["weight"]) for layer in wrapped.moe_layers()}
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    wrapped.prune_experts(
        MoEPruneConfig(method="wanda", weight_sparsity=0.5, method_options={"targets": "router"}), calibration=CALIB
    )
    for name, param in model.named_parameters():
        if id(param) in routers:
            assert _zero_share(param) == 0.5, name
        else:
            assert torch.equal(param, before[name]), name
    assert len(routers) == len(wrapped.moe_layers())


def test_phase2_targets_experts_keeps_router_and_attention():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    wrapped.prune_experts(
        MoEPruneConfig(method="stun", experts_per_layer=4, weight_sparsity=0.5, unstructured="wanda",
                       method_options={"targets": "experts"}),
        calibration=CALIB,
    )
    for name, param in wrapped.model.named_parameters():
        if ".layers." in name and param.dim() >= 2:
            assert _zero_share(param) == (0.5 if ".experts." in name else 0.0), name


# ----------------------------------------------------------------------------- uniform and top-k


def test_uniform_gives_one_count_per_layer_from_the_total_that_loads_natively(tmp_path):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=8, method_options={"uniform": True}))
    assert [s["num_experts"] for s in wrapped.summary()] == [4, 4]
    logits = logits_of(wrapped.model, IDS)
    wrapped.save_pretrained(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the family's own class: vLLM-style loaders
    torch.testing.assert_close(logits_of(plain, IDS), logits, rtol=0, atol=0)


def test_uniform_refuses_a_total_that_does_not_split_into_one_count_per_layer():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))  # 2 layers of 6 experts
    with pytest.raises(ValueError, match=r"num_experts_total=9 does not split .* keeps 8\); ask for 8"):
        wrapped.prune_experts(MoEPruneConfig(method="stun", num_experts_total=9, method_options={"uniform": True}))
    assert [s["num_experts"] for s in wrapped.summary()] == [6, 6]


def test_frequency_refuses_uniform_with_adaptive_before_calibration():
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    config = MoEPruneConfig(method="frequency", expert_sparsity=0.5, adaptive=True, method_options={"uniform": True})
    with pytest.raises(ValueError, match=r"drop adaptive=True"):
        wrapped.prune_experts(config, calibration=None)
    wrapped.prune_experts(MoEPruneConfig(method="frequency", expert_sparsity=0.5, method_options={"uniform": True}),
                          calibration=CALIB)
    assert [s["num_experts"] for s in wrapped.summary()] == [3, 3]


def test_layers_left_with_top_k_experts_get_one_warning(caplog):
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))  # top-k 2
    with caplog.at_level(logging.WARNING):
        wrapped.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=CALIB)
    assert not [r for r in caplog.records if "top-k" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        wrapped.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=2), calibration=CALIB)
    warnings = [r.getMessage() for r in caplog.records if "no longer chooses" in r.getMessage()]
    assert len(warnings) == 1
    assert "model.layers.0.mlp" in warnings[0] and "model.layers.1.mlp" in warnings[0]
