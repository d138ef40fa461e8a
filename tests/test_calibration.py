"""Calibration inputs of every accepted kind, and statistics that match the routing the model does."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of
from datasets import Dataset

from hf_moeprune.calibration import collect_statistics, prepare_calibration
from hf_moeprune.calibration.statistics import RECORDING_IMPLEMENTATION, _register_recording_implementation
from hf_moeprune.families import registered_families
from hf_moeprune.moe_layers import find_moe_layers


def test_inputs_of_every_kind_pack_into_equal_blocks(tiny_tokenizer, sample_texts):
    from_texts = prepare_calibration(sample_texts, tiny_tokenizer, seq_len=32, batch_size=4)
    from_dataset = prepare_calibration(Dataset.from_dict({"text": sample_texts}), tiny_tokenizer, seq_len=32, batch_size=4)
    assert torch.equal(torch.cat(from_texts.batches), torch.cat(from_dataset.batches))
    assert all(batch.shape[1] == 32 for batch in from_texts.batches)
    ids = torch.randint(4, VOCAB, (5, 16))
    assert torch.equal(torch.cat(prepare_calibration(ids, batch_size=2).batches), ids)
    assert from_texts.record()["num_tokens"] == from_texts.num_tokens > 0


def test_dataset_without_text_column(tiny_tokenizer):
    with pytest.raises(ValueError, match="no 'text' column"):
        prepare_calibration(Dataset.from_dict({"body": ["a b c"]}), tiny_tokenizer)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3", "switch_transformers"])
def test_statistics_count_every_routed_token(family):
    model = build_tiny_model(family)
    layers = find_moe_layers(model, registered_families()[family])
    batch = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, layers, [batch], is_encoder_decoder=family == "switch_transformers", progress=False)
    for layer in layers:
        s = stats[layer.path]
        assert s.tokens == 32
        if family != "switch_transformers":  # Switch drops tokens over expert capacity
            assert s.counts.sum() == 32 * layer.top_k
        assert torch.equal(s.coactivation.diagonal(), s.counts)
        assert torch.allclose(s.prob_mass.sum(), torch.tensor(32.0, dtype=torch.float64))
        used = s.counts > 0
        assert (s.input_sq[used].sum(-1) > 0).all() and (s.output_norm_sum[used] > 0).all()
        assert (s.input_sq[~used] == 0).all()
        similarity = s.router_logit_similarity()
        torch.testing.assert_close(similarity.diagonal(), torch.ones(layer.num_experts, dtype=torch.float64))


def test_recording_forward_matches_grouped_mm():
    model = build_tiny_model("mixtral")
    batch = torch.randint(4, VOCAB, (2, 16))
    reference = logits_of(model, batch)
    _register_recording_implementation()
    model.config._experts_implementation = RECORDING_IMPLEMENTATION
    torch.testing.assert_close(logits_of(model, batch), reference, atol=1e-5, rtol=0)
