"""The streaming benchmark's synthetic Mixtral checkpoints: Hub key layout, sharded, loadable by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.synthetic_checkpoint import (
    MixtralShape,
    shape_for_bytes,
    tokenizer_vocab_size,
    write_synthetic_mixtral,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    shape = MixtralShape(vocab_size=tokenizer_vocab_size(), hidden_size=64, intermediate_size=32,
                         num_hidden_layers=2, num_local_experts=4, head_dim=16)
    folder = tmp_path_factory.mktemp("synthetic") / "mixtral"
    lm_head_bytes = 2 * shape.vocab_size * shape.hidden_size
    total = write_synthetic_mixtral(folder, shape, shard_bytes=shape.num_bytes() - lm_head_bytes)
    return shape, folder, total


def test_tiny_checkpoint_is_sharded_in_the_hub_layout(tiny):
    shape, folder, total = tiny
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert total == index["metadata"]["total_size"] == shape.num_bytes()
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    assert "lm_head.weight" in index["weight_map"]
    for name in files:
        with safe_open(folder / name, "pt") as shard:
            assert set(shard.keys()) == {key for key, file in index["weight_map"].items() if file == name}
            assert all(shard.get_slice(key).get_dtype() == "BF16" for key in shard.keys())


def test_tiny_checkpoint_loads_with_fused_experts_and_finite_logits(tiny):
    shape, folder, _ = tiny
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    experts = model.model.layers[1].mlp.experts
    hidden, inter, count = shape.hidden_size, shape.intermediate_size, shape.num_local_experts
    assert tuple(experts.gate_up_proj.shape) == (count, 2 * inter, hidden)
    assert tuple(experts.down_proj.shape) == (count, hidden, inter)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    prefix = "model.layers.1.block_sparse_moe.experts.2"
    with safe_open(folder / index["weight_map"][f"{prefix}.w1.weight"], "pt") as shard:
        w1, w3 = shard.get_tensor(f"{prefix}.w1.weight"), shard.get_tensor(f"{prefix}.w3.weight")
        w2 = shard.get_tensor(f"{prefix}.w2.weight")
    assert torch.equal(experts.gate_up_proj[2], torch.cat([w1, w3]))
    assert torch.equal(experts.down_proj[2], w2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) <= model.config.vocab_size
    batch = tokenizer(["The court heard the case on Tuesday.", "To be, or not to be"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == shape.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize("gigabytes", [0.5, 3, 6, 30])
def test_shapes_hit_the_target_size_with_small_layers(gigabytes):
    shape = shape_for_bytes(gigabytes * 1e9)
    assert 0.95 <= shape.num_bytes() / (gigabytes * 1e9) <= 1.0
    layer = sum(2 * torch.Size(size).numel() for name, size in shape.tensor_shapes() if name.startswith("model.layers.0."))
    assert layer < shape.num_bytes() / 6


def test_refuses_to_write_into_an_existing_folder(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        write_synthetic_mixtral(tmp_path, shape_for_bytes(0.05e9), shard_bytes=1 << 20)
