"""Reduced checkpoints reload with identical logits; non-uniform ones through both loading paths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of, make_unselectable
from transformers import AutoModelForCausalLM

import hf_moeprune.checkpoint as checkpoint
from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig


@pytest.fixture
def input_ids():
    return torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def test_frequency_prune_saves_family_checkpoint_with_record(tmp_path, input_ids, tiny_tokenizer, sample_texts):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tiny_tokenizer)
    model.prune_experts(MoEPruneConfig(method="frequency", experts_per_layer=3), calibration=sample_texts, seq_len=32)
    expected = logits_of(model, input_ids)
    folder = model.save_pretrained(tmp_path / "out")

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits_of(reloaded, input_ids), expected, atol=0, rtol=0)
    record = json.loads((folder / "config.json").read_text())["moeprune"]
    assert record["uniform"] is True and record["steps"][0]["method"] == "frequency"
    assert record["steps"][0]["config"]["experts_per_layer"] == 3
    assert record["steps"][0]["calibration"]["num_tokens"] > 0
    for entry in record["layers"].values():
        assert entry["original_num_experts"] == 6 and entry["num_experts"] == 3 and len(entry["groups"]) == 3
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert (folder / "tokenizer.json").exists()


def _make_non_uniform(model):
    from hf_moeprune.surgery import LayerPlan, ReductionPlan

    layers = model.moe_layers()
    plans = {layers[0].path: LayerPlan.keep([0, 2, 5]), layers[1].path: LayerPlan(groups=[[0, 1], [2, 3], [4], [5]])}
    model.apply_plan(ReductionPlan(plans))
    assert model.record["uniform"] is False


def test_non_uniform_loads_through_auto_class_and_remote_code(tmp_path, input_ids):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    _make_non_uniform(model)
    expected = logits_of(model, input_ids)
    folder = model.save_pretrained(tmp_path / "nonuniform")

    through_auto = AutoMoEPruneModelForCausalLM.from_pretrained(folder)
    assert [layer.num_experts for layer in through_auto.moe_layers()] == [3, 4]
    torch.testing.assert_close(logits_of(through_auto, input_ids), expected, atol=0, rtol=0)

    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(remote).__name__ == "MoEPrunedForCausalLM"
    torch.testing.assert_close(logits_of(remote, input_ids), expected, atol=0, rtol=0)
    record = json.loads((folder / "config.json").read_text())["moeprune"]
    assert record["layers"]["model.layers.1.mlp"]["groups"] == [[0, 1], [2, 3], [4], [5]]
    assert record["layers"]["model.layers.1.mlp"]["merge_weights"][0] == [0.5, 0.5]


def test_interrupted_save_leaves_no_output_folder(tmp_path, monkeypatch):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))

    def fail_midway(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated interrupt")

    monkeypatch.setattr(type(model.model), "save_pretrained", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_checkpoint_whole(tmp_path, input_ids):
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    target = checkpoint.save_checkpoint(model.model, model.moe_layers(), model.record, tmp_path / "out")
    (target / "stale.bin").write_bytes(b"old")
    checkpoint.save_checkpoint(model.model, model.moe_layers(), model.record, target, overwrite=True)
    assert not (target / "stale.bin").exists() and (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left beside it


def test_adaptive_frequency_gives_non_uniform_counts_that_reload(tmp_path, input_ids):
    """One layer routes almost everything to two experts, the other spreads evenly: the global ranking keeps
    fewer experts in the first."""
    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"))
    layers = model.moe_layers()
    calibration = torch.randint(4, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    make_unselectable(model.model, layers[:1], [2, 3, 4, 5], calibration)
    with torch.no_grad():
        layers[1].router_tensors()["weight"].mul_(0.01)
    model.prune_experts(MoEPruneConfig(method="frequency", num_experts_total=7, adaptive=True), calibration=calibration)
    counts = [layer.num_experts for layer in model.moe_layers()]
    assert sum(counts) == 7 and counts[0] < counts[1]
    expected = logits_of(model, input_ids)
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "adaptive"))
    torch.testing.assert_close(logits_of(reloaded, input_ids), expected, atol=0, rtol=0)
