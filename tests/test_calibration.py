"""Calibration inputs of every accepted kind, and statistics that match the routing the model does."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny_model, logits_of
from datasets import Dataset

from hf_moeprune.calibration import LayerStatistics, collect_statistics, prepare_calibration
from hf_moeprune.calibration.statistics import (
    RECORDING_IMPLEMENTATION,
    _register_recording_implementation,
    recording_experts_forward,
)
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


def _routed_pairs(layer, selected: torch.Tensor, weights: torch.Tensor) -> list[tuple[int, int, float]]:
    """(token, expert, gate) for every token-expert pair the experts module was called with: top-k indices
    and weights for fused layouts, a one-hot dispatch mask (all zero for a dropped token) for Switch."""
    if layer.spec.expert_layout == "fused":
        return [(t, int(e), float(g)) for t in range(selected.shape[0]) for e, g in zip(selected[t], weights[t], strict=True)]
    mask = selected.reshape(selected.shape[0], -1)
    return [(t, int(mask[t].argmax()), float(weights[t, 0])) for t in range(mask.shape[0]) if mask[t].any()]


def _expert_by_definition(layer, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intermediate activations, output) of one expert on one token, from its weights as transformers'
    eager loop defines them; the output is checked against the experts module's own forward."""
    experts = layer.experts
    if layer.spec.expert_layout == "fused":
        def linear(value, name):
            weight = getattr(experts, name)[expert]
            out = value @ weight if experts.is_transposed else value @ weight.T
            return out + getattr(experts, f"{name}_bias")[expert] if experts.has_bias else out

        hidden = linear(x, "gate_up_proj" if experts.has_gate else "up_proj")
        a = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
        y = linear(a, "down_proj")
        own = experts(x[None], torch.tensor([[expert]]), torch.ones(1, 1))[0]
    else:
        module = layer.expert_module(expert)
        a = module.act(module.wi(x))
        y = module.wo(a)
        own = module(x[None])[0]
    torch.testing.assert_close(y, own, rtol=1e-5, atol=1e-6)
    return a, y


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "switch_transformers"])
@torch.no_grad()
def test_statistics_equal_their_definitions_token_by_token(family):
    """Every running sum equals the same quantity computed pair by pair from what the router and the experts
    were given: counts, REAP's gated and softmax-weighted output norms, output sums and peaks, Wanda's input
    and intermediate squares, router-logit sums, Gram matrix, probability mass and the first logit rows, and
    co-activation. Switch's expert capacity is set so that tokens are dropped."""
    overrides = {"expert_capacity": 3} if family == "switch_transformers" else {}
    model = build_tiny_model(family, **overrides)
    layers = find_moe_layers(model, registered_families()[family])
    seen: dict[str, list] = {layer.path: [] for layer in layers}
    hooks = []
    for layer in layers:
        hooks.append(layer.router.register_forward_pre_hook(lambda m, a, p=layer.path: seen[p].append([a[0]])))
        hooks.append(layer.experts.register_forward_pre_hook(lambda m, a, p=layer.path: seen[p][-1].extend(a)))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, VOCAB, (2, 8), generator=generator) for _ in range(2)]
    seq2seq = {"is_encoder_decoder": True} if family == "switch_transformers" else {}  # decoders: the default
    # 17 logit rows kept: all 16 of the first forward, then room for exactly one
    stats = collect_statistics(model, layers, batches, progress=False, max_logit_samples=17, **seq2seq)
    for hook in hooks:
        hook.remove()
    for layer in layers:
        s, e = stats[layer.path], layer.num_experts
        weight = layer.router_tensors()["weight"].float()
        bias = layer.router_tensors().get("bias")
        expected = LayerStatistics(num_experts=e, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size)
        logits_seen, dropped = [], 0
        for router_input, hidden, selected, gates in seen[layer.path]:
            logits = router_input.reshape(-1, weight.shape[1]).float() @ weight.T
            logits = logits + bias.float() if bias is not None else logits
            logits_seen.append(logits)
            probs = logits.softmax(-1)
            pairs = _routed_pairs(layer, selected, gates)
            dropped += hidden.shape[0] - len({t for t, _, _ in pairs})
            for t, expert, gate in pairs:
                a, y = _expert_by_definition(layer, expert, hidden[t])
                norm = float(y.norm())
                expected.counts[expert] += 1
                expected.output_norm_sum[expert] += norm
                expected.gated_output_norm_sum[expert] += gate * norm
                expected.prob_output_norm_sum[expert] += float(probs[t, expert]) * norm
                expected.output_sum[expert] += y.double()
                expected.output_max[expert] = max(float(expected.output_max[expert]), float(y.abs().max()))
                expected.output_signed_max[expert] = max(float(expected.output_signed_max[expert]), float(y.max()))
                expected.input_sq[expert] += hidden[t].double().square()
                expected.intermediate_sq[expert, : a.shape[-1]] += a.double().square()
            for t in range(hidden.shape[0]):
                chosen = sorted({expert for token, expert, _ in pairs if token == t})
                for i in chosen:
                    for j in chosen:
                        expected.coactivation[i, j] += 1
        logits = torch.cat(logits_seen)
        assert s.tokens == logits.shape[0] == 32
        assert (dropped > 0) == (family == "switch_transformers")
        torch.testing.assert_close(s.counts, expected.counts, rtol=0, atol=0)
        torch.testing.assert_close(s.prob_pairs, expected.counts, rtol=0, atol=0)
        torch.testing.assert_close(s.coactivation, expected.coactivation, rtol=0, atol=0)
        torch.testing.assert_close(s.logit_sample, logits[:17], rtol=1e-6, atol=1e-6)
        float32 = dict(rtol=1e-5, atol=1e-5)  # float32 products summed in another order (entries up to ~10)
        torch.testing.assert_close(s.logit_sum, logits.sum(0).double(), **float32)
        torch.testing.assert_close(s.logit_gram, (logits.T @ logits).double(), **float32)
        torch.testing.assert_close(s.prob_mass, logits.softmax(-1).sum(0).double(), **float32)
        for name in ("output_norm_sum", "gated_output_norm_sum", "prob_output_norm_sum", "output_sum",
                     "output_max", "output_signed_max", "input_sq", "intermediate_sq"):
            torch.testing.assert_close(getattr(s, name), getattr(expected, name), **float32, msg=lambda m, name=name: f"{name}: {m}")
        used = expected.counts > 0
        torch.testing.assert_close(s.mean_output()[used], s.output_sum[used] / expected.counts[used, None], rtol=0, atol=0)
        assert (s.mean_output()[~used] == 0).all()
    with pytest.raises(ValueError, match="Unknown similarity 'pearson': use 'cosine' or 'correlation'"):
        s.router_logit_similarity("pearson")


def _standalone_experts(kind: str) -> torch.nn.Module:
    """A fused experts module of a family the generic fallback may meet: Nemotron-H's has no gate
    (down(act(up x))), Muse Spark's normalises each expert's output."""
    if kind == "ungated":
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        module = NemotronHExperts(NemotronHConfig(n_routed_experts=4, hidden_size=16, moe_intermediate_size=8))
    else:
        from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

        module = MuseSparkExperts(MuseSparkTextConfig(num_local_experts=4, moe_hidden_size=16, moe_intermediate_size=8))
    module.config._experts_implementation = "eager"
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, 0, 0.3)
    return module


@pytest.mark.parametrize("kind", ["ungated", "post_norm"])
@torch.no_grad()
def test_recording_forward_matches_ungated_and_post_normed_experts(kind):
    module = _standalone_experts(kind)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, generator=generator)
    stats = LayerStatistics(num_experts=4, hidden_size=16, intermediate_size=8)
    module._moeprune_recorder = stats
    torch.testing.assert_close(recording_experts_forward(module, hidden, index, weights), module(hidden, index, weights))
    pairs = [(t, int(e)) for t in range(12) for e in index[t]]
    expected_sum, expected_counts = torch.zeros(4, 16, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, expert in pairs:
        expected_sum[expert] += module(hidden[t : t + 1], torch.tensor([[expert]]), torch.ones(1, 1))[0].double()
        expected_counts[expert] += 1
    torch.testing.assert_close(stats.counts, expected_counts, rtol=0, atol=0)
    torch.testing.assert_close(stats.output_sum, expected_sum, rtol=1e-5, atol=1e-6)
    if kind == "ungated":
        up = module.up_proj
        expected_sq = torch.zeros(4, 8, dtype=torch.float64)
        for t, expert in pairs:
            expected_sq[expert] += module.act_fn(hidden[t] @ up[expert].T).double().square()
        torch.testing.assert_close(stats.intermediate_sq, expected_sq, rtol=1e-5, atol=1e-6)


def test_co_activation_skips_the_no_expert_sentinels():
    """Routers may mark a slot with no expert (index -1, or E for the "dropped" column some families one-hot
    encode): such slots count for no expert, and the sums accumulate over calls."""
    stats = LayerStatistics(num_experts=4, hidden_size=2, intermediate_size=2)
    stats.record_routing(torch.tensor([[0, 2], [1, -1], [3, 4]]))
    stats.record_routing(torch.tensor([[2, 0]]))
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for chosen in ([0, 2], [1], [3], [2, 0]):
        for i in chosen:
            for j in chosen:
                expected[i, j] += 1
    torch.testing.assert_close(stats.coactivation, expected, rtol=0, atol=0)


def test_input_norms_sum_every_squared_input_over_all_batches_in_float64():
    """Wanda's ||X_j||^2 for a linear: every token of every batch, squared, per input feature."""
    from hf_moeprune.calibration.sequential import InputNormCollector

    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    batches = [torch.randn(2, 4, 5), torch.randn(1, 3, 5)]
    with InputNormCollector({"proj": linear}) as collector:
        for batch in batches:
            linear(batch)
    expected = sum(b.reshape(-1, 5).double().pow(2).sum(0) for b in batches)
    assert collector.sq["proj"].dtype == torch.float64
    assert torch.allclose(collector.sq["proj"], expected, rtol=1e-6, atol=0)  # float32 squares, float64 sums
    linear(batches[0])  # the hooks are gone after the block
    assert torch.allclose(collector.sq["proj"], expected, rtol=1e-6, atol=0)


def test_decoder_layers_are_the_longest_list_of_one_block_type_first_found_on_ties():
    from torch import nn

    from hf_moeprune.calibration.sequential import find_decoder_layers, layer_output

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])  # longer, but of linears

    class Model(nn.Module):
        def __init__(self, layers: int) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.ReLU(), nn.Tanh(), nn.ReLU()])
            self.layers = nn.ModuleList([Block() for _ in range(layers)])
            self.twins = nn.ModuleList([Block() for _ in range(layers)])

    one = Model(1)
    assert find_decoder_layers(one) == ("layers", one.layers)
    two = Model(2)
    assert find_decoder_layers(two) == ("layers", two.layers)
    with pytest.raises(ValueError) as raised:
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    assert str(raised.value) == "Sequential has no list of decoder layers; sequential calibration needs one."
    hidden = torch.ones(2)
    assert layer_output((hidden, "cache")) is hidden and layer_output(hidden) is hidden


def test_spilled_batches_come_back_equal_and_their_folder_goes_on_release(tmp_path):
    from hf_moeprune.calibration.sequential import DiskBatches

    batches = DiskBatches(tmp_path)
    tensors = [torch.arange(6.0).view(2, 3), torch.ones(1, 3)]
    for tensor in tensors:
        batches.append(tensor)
    assert len(batches) == 2 and all(torch.equal(a, b) for a, b in zip(batches, tensors, strict=True))
    assert batches.folder.parent == tmp_path and len(list(batches.folder.iterdir())) == 2
    batches.release()
    assert not batches.folder.exists()
    batches.release()  # a second release (a resumed run's cleanup) is harmless
