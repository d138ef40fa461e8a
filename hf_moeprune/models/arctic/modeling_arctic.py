"""Snowflake Arctic as a native transformers 5 model.

Arctic (https://huggingface.co/Snowflake/snowflake-arctic-instruct) ships its own modeling code
written for transformers 4 and DeepSpeed. This is the same architecture in the conventions of the
installed transformers, so that every tool built for its MoE families (fused experts with
`@use_experts_implementation`, the `(logits, weights, index)` router, hooks, caches, attention
backends, weight conversion on load and save) works on Arctic unchanged:

- attention, rotary embedding and RMSNorm are Mixtral's (identical to Arctic's);
- MoE layer: `block_sparse_moe.gate` ([`ArcticTopKRouter`], `weight [E, H]`) and
  `block_sparse_moe.experts` ([`ArcticExperts`], fused `gate_up_proj [E, 2I, H]` with the gate half
  first, `down_proj [E, H, I]`); the checkpoint's per-expert `experts.{j}.w1/w3/w2` keys are fused on
  load and split back on `save_pretrained` (see `hf_moeprune.models.arctic.register_arctic`);
- dense layer: `block_sparse_moe.mlp.{w1,w2,w3}`;
- with `parallel_attn_mlp_res`, MoE layers add `residual_layernorm` + `residual_mlp.{w1,w2,w3}`
  (ffn dim = hidden size), and the decoder layer computes

      h   = x + attn(input_layernorm(x))
      out = h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x))

  (the MoE reads the pre-attention input `x`); otherwise `out = h + moe_or_mlp(post_attention_layernorm(h))`.

Each MoE layer has its own expert count (`ArcticConfig.num_experts_for_layer`), so checkpoints
pruned to different sizes per layer load natively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    load_balancing_loss_func,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_arctic import ArcticConfig


class ArcticRMSNorm(MixtralRMSNorm):
    """RMSNorm, as Mixtral's: `weight * x / sqrt(mean(x^2) + eps)` computed in float32."""


class ArcticRotaryEmbedding(MixtralRotaryEmbedding):
    """Rotary position embedding, as Mixtral's (`rope_parameters` of the config)."""


class ArcticAttention(MixtralAttention):
    """Grouped-query attention with rotary embeddings and the configured attention backend, as Mixtral's."""


class ArcticMLP(nn.Module):
    """SwiGLU MLP `w2(act(w1 x) * w3 x)`: the dense-layer MLP and the residual MLP of Arctic.

    Args:
        config ([`ArcticConfig`]): model configuration.
        intermediate_size (`int`, optional): ffn width; defaults to `config.intermediate_size`
            (the residual MLP passes `config.hidden_size`).
    """

    def __init__(self, config: ArcticConfig, intermediate_size: int | None = None):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.intermediate_size if intermediate_size is None else intermediate_size
        self.w1 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.w2 = nn.Linear(self.ffn_dim, self.hidden_dim, bias=False)
        self.w3 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states))


@use_experts_implementation
class ArcticExperts(nn.Module):
    """The routed experts of one MoE layer, stored fused as 3-D tensors.

    `gate_up_proj [E, 2I, H]` holds each expert's `w1` (gate, first half) and `w3` (up, second half);
    `down_proj [E, H, I]` its `w2`. Expert `e` computes `down_e(act(gate_e x) * up_e x)`. The forward
    is dispatched by `config._experts_implementation` (grouped_mm, eager, or a registered function).

    Args:
        config ([`ArcticConfig`]): model configuration.
        num_experts (`int`): number of experts of this layer.
    """

    def __init__(self, config: ArcticConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        # eager path: loop over the experts that received tokens
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:  # expert-parallel sentinel
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


class ArcticTopKRouter(nn.Module):
    """Arctic's router: softmax over `weight @ x` in float32, top-k, renormalised over the k when k > 1.

    Returns `(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`; the weights are cast to
    the input dtype, as in the original code.

    Args:
        config ([`ArcticConfig`]): model configuration.
        num_experts (`int`): number of experts of this layer.
    """

    def __init__(self, config: ArcticConfig, num_experts: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits.float(), dim=-1)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.top_k > 1:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


class ArcticSparseMoeBlock(nn.Module):
    """The MoE block of an Arctic MoE layer: `gate` (router) and `experts` (fused routed experts).

    Args:
        config ([`ArcticConfig`]): model configuration.
        num_experts (`int`): number of experts of this layer.
    """

    is_moe_layer = True

    def __init__(self, config: ArcticConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = ArcticTopKRouter(config, num_experts)
        self.experts = ArcticExperts(config, num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        return hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class ArcticDenseBlock(nn.Module):
    """The feed-forward block of an Arctic dense (non-MoE) layer: one SwiGLU `mlp`.

    It sits at the same place as the MoE block (`block_sparse_moe`) so the checkpoint keys
    `block_sparse_moe.mlp.{w1,w2,w3}` load unchanged.
    """

    is_moe_layer = False

    def __init__(self, config: ArcticConfig):
        super().__init__()
        self.mlp = ArcticMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states)


class ArcticDecoderLayer(GradientCheckpointingLayer):
    """One Arctic decoder layer (see the module docstring for the formula).

    Args:
        config ([`ArcticConfig`]): model configuration.
        layer_idx (`int`): index of the layer, which decides MoE vs dense and the expert count.
    """

    def __init__(self, config: ArcticConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.is_moe_layer = config.is_moe_layer(layer_idx)
        self.self_attn = ArcticAttention(config, layer_idx)
        if self.is_moe_layer:
            self.block_sparse_moe = ArcticSparseMoeBlock(config, config.num_experts_for_layer(layer_idx))
        else:
            self.block_sparse_moe = ArcticDenseBlock(config)
        self.input_layernorm = ArcticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ArcticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # the residual MLP exists on MoE layers only
        self.parallel_attn_mlp_res = bool(config.parallel_attn_mlp_res) and self.is_moe_layer
        if self.parallel_attn_mlp_res:
            self.residual_layernorm = ArcticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.residual_mlp = ArcticMLP(config, intermediate_size=config.hidden_size)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual_input = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        residual_attn = residual_input + hidden_states
        if self.parallel_attn_mlp_res:
            # the MoE reads the pre-attention input so it can run in parallel with attention
            residual_residual = residual_attn + self.residual_mlp(self.residual_layernorm(residual_attn))
            return residual_residual + self.block_sparse_moe(self.post_attention_layernorm(residual_input))
        return residual_attn + self.block_sparse_moe(self.post_attention_layernorm(residual_attn))


class ArcticPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by the Arctic models."""

    config_class = ArcticConfig
    config: ArcticConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArcticDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # layers differ in expert count and structure
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(ArcticTopKRouter, index=0),
        "hidden_states": ArcticDecoderLayer,
        "attentions": ArcticAttention,
    }

    def expert_counts(self) -> list[int]:
        """Experts each decoder layer holds now (0 for dense layers), read from the modules themselves."""
        base = getattr(self, self.base_model_prefix, self)
        return [
            layer.block_sparse_moe.experts.num_experts if layer.is_moe_layer else 0 for layer in base.layers
        ]

    def sync_config_expert_counts(self) -> None:
        """Make `config.num_local_experts` describe the experts the layers hold now.

        Expert surgery may leave the config with one count while layers differ; this writes the per-layer
        list (or an int when every MoE layer agrees), so the saved `config.json` rebuilds these shapes.
        """
        for i, count in enumerate(self.expert_counts()):
            if self.config.is_moe_layer(i) and count != self.config.num_experts_for_layer(i):
                self.config.set_num_experts_for_layer(i, count)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.sync_config_expert_counts()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ArcticExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, ArcticTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class ArcticModel(ArcticPreTrainedModel):
    """The Arctic decoder stack without a head; returns the final hidden states."""

    def __init__(self, config: ArcticConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ArcticDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ArcticRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ArcticRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            )
            position_ids = position_ids.unsqueeze(0)

        mask_function = (
            create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        )
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def arctic_load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | None,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """Switch-Transformer load-balancing loss, computed per MoE layer and averaged over the layers.

    Per layer so that layers with different expert counts (pruned checkpoints) are each balanced
    against their own count; with equal counts and one layer it equals Mixtral's loss.
    """
    if not router_logits or not isinstance(router_logits, tuple):
        return 0
    losses = [
        load_balancing_loss_func((logits,), logits.shape[-1], top_k, attention_mask)
        for logits in router_logits
    ]
    return torch.stack([torch.as_tensor(loss) for loss in losses]).mean()


class ArcticForCausalLM(ArcticPreTrainedModel, GenerationMixin):
    """Arctic with a language-modelling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ArcticConfig):
        super().__init__(config)
        self.model = ArcticModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""Args as [`~transformers.MixtralForCausalLM.forward`]; `labels` gives the shifted LM loss, plus
        `router_aux_loss_coef` times the load-balancing loss when `output_router_logits`."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            aux_loss = arctic_load_balancing_loss(
                outputs.router_logits, self.num_experts_per_tok, attention_mask
            )
            if labels is not None:
                loss += self.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


__all__ = [
    "ArcticDecoderLayer",
    "ArcticDenseBlock",
    "ArcticExperts",
    "ArcticForCausalLM",
    "ArcticMLP",
    "ArcticModel",
    "ArcticPreTrainedModel",
    "ArcticSparseMoeBlock",
    "ArcticTopKRouter",
]
