"""Synthetic Mixtral checkpoints of a chosen size in the Hugging Face Hub layout, written one shard at a time.

The Hub's Mixtral checkpoints store every expert as its own keys (`block_sparse_moe.experts.{e}.w1.weight`);
transformers 5 fuses them into 3-D tensors on load. Writing that layout here is what lets the benchmark
exercise the conversion a streaming loader must do, on checkpoints far bigger than memory, without the Hub.
Weights are random (std 0.02, norms 1) so forward passes stay finite; the tokenizer is the shipped testbed's,
so calibration text tokenises and the vocabulary matches it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

from hf_moeprune.testbed import testbed_path

WEIGHT_STD = 0.02
BYTES_PER_PARAM = 2  # bf16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class MixtralShape:
    """The sizes that fix every tensor of a Mixtral checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    head_dim: int = 64

    def __post_init__(self) -> None:
        heads = self.hidden_size // self.head_dim
        if self.hidden_size % self.head_dim or heads % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 * head_dim "
                             f"({4 * self.head_dim}) so that there are 4 query heads per key/value head.")

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads // 4

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight name and shape, in the order of the Hub's Mixtral index (embedding, layers, head)."""
        hidden, inter, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, hidden))]
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            shapes += [
                (f"{prefix}.input_layernorm.weight", (hidden,)),
                (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
                (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
                (f"{prefix}.block_sparse_moe.gate.weight", (self.num_local_experts, hidden)),
            ]
            for expert in range(self.num_local_experts):
                experts = f"{prefix}.block_sparse_moe.experts.{expert}"
                shapes += [(f"{experts}.w1.weight", (inter, hidden)), (f"{experts}.w2.weight", (hidden, inter)),
                           (f"{experts}.w3.weight", (inter, hidden))]
        shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (self.vocab_size, hidden))]
        return shapes

    def num_bytes(self) -> int:
        return BYTES_PER_PARAM * sum(math.prod(shape) for _, shape in self.tensor_shapes())

    def config(self, template: dict) -> MixtralConfig:
        """A MixtralConfig for this shape; special tokens and context length come from the tokenizer's model."""
        return MixtralConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok,
            max_position_embeddings=template["max_position_embeddings"], bos_token_id=template["bos_token_id"],
            eos_token_id=template["eos_token_id"], pad_token_id=template["pad_token_id"],
            tie_word_embeddings=False, dtype="bfloat16", architectures=["MixtralForCausalLM"],
        )


def tokenizer_vocab_size() -> int:
    """The vocabulary of the shipped tokenizer, which every synthetic checkpoint must match."""
    return json.loads((testbed_path() / "config.json").read_text())["vocab_size"]


def shape_for_bytes(target_bytes: float, num_experts: int = 8) -> MixtralShape:
    """A Mixtral shape whose bf16 checkpoint is close to (at most a few percent under) `target_bytes`.

    Depth grows with the cube root of the size (8 layers at 0.5 GB, about 32 at 30 GB) so that one decoder
    layer stays a small fraction of the checkpoint; hidden size follows from the per-layer budget (a multiple
    of 256) and the expert width fills what is left of it (a multiple of 64).
    """
    if target_bytes <= 0:
        raise ValueError(f"the checkpoint size must be positive, got {target_bytes:g} bytes.")
    vocab = tokenizer_vocab_size()
    params = target_bytes / BYTES_PER_PARAM
    layers = min(32, max(2, round(10 * (target_bytes / 1e9) ** (1 / 3))))
    # per layer: experts 3 * E * hidden * inter with inter ~ 3.5 * hidden, attention ~ 2.5 * hidden^2
    hidden = max(256, 256 * round(math.sqrt(params / layers / (10.5 * num_experts + 2.5)) / 256))
    per_layer = (params - 2 * vocab * hidden - hidden) / layers
    attention_and_router = 2.5 * hidden * hidden + num_experts * hidden + 2 * hidden
    inter = 64 * int((per_layer - attention_and_router) / (3 * num_experts * hidden) / 64)
    if inter < 64:
        raise ValueError(f"{target_bytes / 1e9:g} GB is too small for a Mixtral with a {vocab}-token vocabulary; "
                         "ask for at least 0.05 GB.")
    return MixtralShape(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_local_experts=num_experts)


def _shard_plan(shape: MixtralShape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most `shard_bytes` (a bigger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, tensor_shape in shape.tensor_shapes():
        size = BYTES_PER_PARAM * math.prod(tensor_shape)
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, tensor_shape))
        filled += size
    return shards


def _random_weight(tensor_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(tensor_shape) == 1:  # RMSNorm scales
        return torch.ones(tensor_shape, dtype=torch.bfloat16)
    return torch.empty(tensor_shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=generator)


def write_synthetic_mixtral(folder: str | Path, shape: MixtralShape, shard_bytes: int, seed: int = 0) -> int:
    """Write a loadable bf16 Mixtral checkpoint (shards, index, config, tokenizer) into the new folder `folder`.

    Only one shard's tensors are in memory at a time. Returns the bytes of weights written.

    Args:
        folder (`str` or `Path`): must not exist yet.
        shape (`MixtralShape`): sizes of every tensor, e.g. from `shape_for_bytes(3e9)`.
        shard_bytes (`int`): largest shard, as `save_pretrained(max_shard_size=...)` would split.
        seed (`int`): the same seed and shape give the same weights.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; give a new folder for the synthetic checkpoint.")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}.")
    folder.mkdir(parents=True)
    template = json.loads((testbed_path() / "config.json").read_text())
    shape.config(template).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(testbed_path() / name, folder / name)
    plan = _shard_plan(shape, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(plan, start=1):
        filename = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: _random_weight(tensor_shape, generator) for name, tensor_shape in shard}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    index_json = {"metadata": {"total_size": total, "synthetic_shape": asdict(shape)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return total
