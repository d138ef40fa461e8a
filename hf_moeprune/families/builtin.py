"""Family specs for the MoE architectures shipped with transformers 5.

Each entry was read off the installed modeling code (`transformers/models/<family>/modeling_*.py`).
"""

from __future__ import annotations

from .spec import ExpertTensor, FamilySpec

BUILTIN_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="mixtral",
        model_types=("mixtral", "minimax"),
        moe_block_patterns=("model.layers.*.mlp",),
        router="gate",
        experts="experts",
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
    ),
    FamilySpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        moe_block_patterns=("model.layers.*.mlp",),
        router="gate",
        experts="experts",
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        never_pruned=("shared_expert", "shared_expert_gate"),
    ),
    FamilySpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        moe_block_patterns=("model.layers.*.mlp",),
        router="gate",
        experts="experts",
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
    ),
    FamilySpec(
        name="olmoe",
        model_types=("olmoe",),
        moe_block_patterns=("model.layers.*.mlp",),
        router="gate",
        experts="experts",
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
    ),
    FamilySpec(
        name="phimoe",
        model_types=("phimoe",),
        moe_block_patterns=("model.layers.*.mlp",),
        router="router",
        experts="experts",
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
    ),
    FamilySpec(
        name="deepseek_v3",
        model_types=("deepseek_v3", "glm4_moe"),
        moe_block_patterns=("model.layers.*.mlp",),
        router="gate",
        experts="experts",
        num_experts_key="n_routed_experts",
        top_k_key="num_experts_per_tok",
        router_tensors=("weight", "e_score_correction_bias"),
        never_pruned=("shared_experts",),
        expert_groups_key="n_group",
    ),
    FamilySpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        moe_block_patterns=("model.layers.*.mlp",),
        router="router",
        experts="experts",
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        expert_tensors=(
            ExpertTensor("gate_up_proj", unit_axis=1, unit_layout="interleave2", in_axis=0),
            ExpertTensor("gate_up_proj_bias", unit_axis=0, unit_layout="interleave2"),
            ExpertTensor("down_proj", unit_axis=0, in_axis=0, input_kind="intermediate"),
            ExpertTensor("down_proj_bias", unit_axis=None),
        ),
    ),
    FamilySpec(
        # native implementation in hf_moeprune/models/arctic (not shipped with transformers). The residual
        # MLP and dense-layer MLPs sit outside the MoE block: expert methods never see them, the unstructured
        # phase reaches them as `dense_mlp` linears.
        name="arctic",
        model_types=("arctic",),
        moe_block_patterns=("model.layers.*.block_sparse_moe",),
        router="gate",
        experts="experts",
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
    ),
    FamilySpec(
        name="switch_transformers",
        model_types=("switch_transformers",),
        moe_block_patterns=("encoder.block.*.layer.1.mlp", "decoder.block.*.layer.2.mlp"),
        router="router.classifier",
        experts="experts",
        num_experts_key="num_experts",
        top_k_key=None,
        expert_layout="modules",
        expert_tensors=(
            ExpertTensor("wi.weight", unit_axis=0, in_axis=1),
            ExpertTensor("wo.weight", unit_axis=1, in_axis=1, input_kind="intermediate"),
        ),
        routing_format="onehot_mask",
        task="seq2seq-lm",
    ),
)
