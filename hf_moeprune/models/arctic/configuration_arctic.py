"""Configuration of Snowflake Arctic (`model_type: "arctic"`), native to this transformers version.

Arctic is a dense-MoE hybrid: every `moe_layer_frequency`-th decoder layer holds a top-k routed MoE
(`block_sparse_moe.gate` + `block_sparse_moe.experts`), the others a dense SwiGLU MLP
(`block_sparse_moe.mlp`); with `parallel_attn_mlp_res` the MoE layers also run a dense residual MLP
(`residual_mlp`, ffn dim = hidden size) in parallel with the MoE. Checkpoint:
https://huggingface.co/Snowflake/snowflake-arctic-instruct

The field names and defaults are those of the configuration file the Arctic checkpoints ship, so
their `config.json` loads unchanged. One extension: `num_local_experts` may be a per-layer list (the
form STUN's non-uniformly pruned Arctic checkpoints use).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class ArcticConfig(PreTrainedConfig):
    r"""Configuration of an [`ArcticForCausalLM`].

    Args:
        vocab_size (`int`, defaults to 32000): vocabulary size.
        hidden_size (`int`, defaults to 4096): model width; also the ffn width of the residual MLP.
        intermediate_size (`int`, defaults to 14336): ffn width of each expert and of the dense-layer MLP.
        num_hidden_layers (`int`, defaults to 32): number of decoder layers.
        num_attention_heads (`int`, defaults to 32), num_key_value_heads (`int`, defaults to
            `num_attention_heads`), head_dim (`int`, optional): attention shape (grouped-query attention).
        num_local_experts (`int` or `list[int]`, defaults to 8): experts per MoE layer. A list has one entry
            per decoder layer (entries of dense layers are ignored) and describes a checkpoint whose layers
            were pruned to different sizes. Read it through [`~ArcticConfig.num_experts_for_layer`].
        num_experts_per_tok (`int`, defaults to 1): experts each token is routed to (Arctic uses 2).
        moe_layer_frequency (`int`, defaults to 2): layer `i` is an MoE layer when
            `(i + 1) % moe_layer_frequency == 0` (Arctic uses 1: every layer).
        parallel_attn_mlp_res (`bool`, defaults to `False`): run the dense residual MLP in parallel with the
            MoE on MoE layers; the MoE then reads the pre-attention hidden states (Arctic uses `True`).
        router_aux_loss_coef (`float`, defaults to 0.001): weight of the load-balancing loss.
        moe_train_capacity_factor, moe_eval_capacity_factor, moe_min_capacity, moe_token_dropping,
        enable_expert_tensor_parallelism, quantization: DeepSpeed options of the original training code,
            carried so the checkpoint's `config.json` round-trips, and ignored here (no token dropping).

    Example:

    ```python
    >>> from hf_moeprune.models.arctic import ArcticConfig, ArcticForCausalLM
    >>> config = ArcticConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    ...                       num_attention_heads=4, num_local_experts=[4, 6], num_experts_per_tok=2,
    ...                       moe_layer_frequency=1, parallel_attn_mlp_res=True)
    >>> config.num_experts_for_layer(1)
    6
    >>> model = ArcticForCausalLM(config)
    ```
    """

    model_type = "arctic"
    default_theta = 1000000.0
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_experts": "num_local_experts"}

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_dropout: float | int = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int | list[int] = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    moe_layer_frequency: int = 2
    parallel_attn_mlp_res: bool = False
    moe_train_capacity_factor: float | int = 1
    moe_eval_capacity_factor: float | int = 1
    enable_expert_tensor_parallelism: bool = False
    moe_min_capacity: int = 0
    moe_token_dropping: bool = True
    quantization: dict[str, Any] | None = None
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check_num_local_experts()

    def _check_num_local_experts(self) -> None:
        if self.moe_layer_frequency < 1:
            raise ValueError(f"`moe_layer_frequency` must be >= 1, got {self.moe_layer_frequency}.")
        if isinstance(self.num_local_experts, list):
            if len(self.num_local_experts) != self.num_hidden_layers:
                raise ValueError(
                    f"A per-layer `num_local_experts` list needs one entry per decoder layer "
                    f"({self.num_hidden_layers}), got {len(self.num_local_experts)}."
                )
        for i in self.moe_layer_indices():
            n = self.num_experts_for_layer(i)
            if n < self.num_experts_per_tok:
                raise ValueError(
                    f"Layer {i} has {n} experts, fewer than `num_experts_per_tok={self.num_experts_per_tok}`."
                )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` holds an MoE block (else a dense MLP)."""
        return (layer_idx + 1) % self.moe_layer_frequency == 0

    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that hold an MoE block."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def num_experts_for_layer(self, layer_idx: int) -> int:
        """Number of routed experts of decoder layer `layer_idx` (0 for a dense layer)."""
        if not self.is_moe_layer(layer_idx):
            return 0
        if isinstance(self.num_local_experts, list):
            return int(self.num_local_experts[layer_idx])
        return int(self.num_local_experts)

    def set_num_experts_for_layer(self, layer_idx: int, num_experts: int) -> None:
        """Record that MoE layer `layer_idx` now has `num_experts` experts.

        The field stays an int while every MoE layer has the same count, and becomes a per-layer list
        otherwise (and back to an int once the layers agree again), so uniform pruning keeps the
        original `config.json` form.
        """
        if not self.is_moe_layer(layer_idx):
            raise ValueError(f"Layer {layer_idx} is a dense layer: it has no experts.")
        counts = [
            num_experts if i == layer_idx else self.num_experts_for_layer(i)
            for i in range(self.num_hidden_layers)
        ]
        moe_counts = {counts[i] for i in self.moe_layer_indices()}
        if len(moe_counts) == 1:
            self.num_local_experts = moe_counts.pop()
        else:
            self.num_local_experts = counts


__all__ = ["ArcticConfig"]
