"""Shared fixtures: the one builder of tiny models (every registered family, the generic fallback, a dense
control), a tiny tokenizer, helpers for routing tricks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

from hf_moeprune.moe_layers import MoELayer

VOCAB = 96
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts_per_tok=2, head_dim=16, eos_token_id=1, bos_token_id=2, pad_token_id=0,
)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_DECODER, num_local_experts=6),
    "qwen2_moe": dict(_DECODER, num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_DECODER, num_experts=6, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(_DECODER, num_experts=6),
    "phimoe": dict(_DECODER, num_local_experts=6),
    "deepseek_v3": dict(
        {k: v for k, v in _DECODER.items() if k != "head_dim"}, num_hidden_layers=3, n_routed_experts=6,
        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    ),
    "gpt_oss": dict(_DECODER, num_local_experts=6, layer_types=["full_attention", "full_attention"]),
    "arctic": dict(_DECODER, num_local_experts=6, moe_layer_frequency=1, parallel_attn_mlp_res=True),
    "switch_transformers": dict(
        vocab_size=VOCAB, d_model=64, d_ff=48, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_experts=6, encoder_sparse_step=1, decoder_sparse_step=1, eos_token_id=1, pad_token_id=0,
        decoder_start_token_id=0,
    ),
}

FAMILIES = sorted(TINY_CONFIGS)

# Model types with no FamilySpec: granitemoe is recognised by the generic fallback (router + fused experts),
# llama is a dense model (unstructured pruning of dense models, the unknown-architecture error).
GENERIC_CONFIGS: dict[str, dict] = {"granitemoe": dict(_DECODER, num_local_experts=6)}
DENSE_CONFIGS: dict[str, dict] = {"llama": dict(_DECODER)}
_ALL_CONFIGS = {**TINY_CONFIGS, **GENERIC_CONFIGS, **DENSE_CONFIGS}


def build_tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of `model_type` in eval mode, weights scaled so routing is not flat.

    `model_type` is a key of TINY_CONFIGS, GENERIC_CONFIGS or DENSE_CONFIGS; `overrides` change config fields.
    """
    config = AutoConfig.for_model(model_type, **{**_ALL_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2 if "gate" in name or "router" in name else 0.08)
            elif param.dim() == 1 and "norm" not in name and "layer_norm" not in name:
                param.normal_(0, 0.02)
    return model


def save_tiny_model(model_type: str, folder: str | Path, tokenizer=None, seed: int = 0, **overrides) -> Path:
    """`build_tiny_model(...)` saved as a checkpoint folder (with `tokenizer` beside it when given)."""
    folder = Path(folder)
    build_tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def model_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": input_ids, "decoder_input_ids": input_ids}
    return {"input_ids": input_ids}


@torch.no_grad()
def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(**model_inputs(model, input_ids), use_cache=False).logits


@torch.no_grad()
def make_unselectable(model: torch.nn.Module, layers: list[MoELayer], remove: list[int], input_ids: torch.Tensor) -> None:
    """Rewrite the router rows of `remove` so those experts lose by a wide margin on `input_ids`.

    Layer by layer (earlier layers change later inputs), solve X d = 1 for the router inputs X of this batch
    (fewer tokens than hidden units, so exactly solvable) and set the rows to -1e4 * d: every token then
    gives those experts a logit of -1e4.
    """
    for layer in layers:
        captured: list[torch.Tensor] = []

        def capture(module, args, captured=captured):
            captured.append(args[0].reshape(-1, args[0].shape[-1]).detach().float())

        handle = layer.router.register_forward_pre_hook(capture)
        logits_of(model, input_ids)
        handle.remove()
        inputs = torch.cat(captured)
        direction = torch.linalg.lstsq(inputs, torch.ones(inputs.shape[0], 1)).solution.squeeze(-1)
        weight = layer.router_tensors()["weight"]
        weight[remove] = (-1e4 * direction).to(weight.dtype)
        bias = layer.router_tensors().get("bias")
        if bias is not None:
            bias[remove] = 0


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + VOCAB - 4)]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    return [
        "The committee met on Tuesday to discuss the budget for next year.",
        "Shall I compare thee to a summer's day? Thou art more lovely.",
        "The striker scored twice as the home side won the cup final.",
        "Shares fell sharply after the company reported weaker profits.",
    ] * 4
