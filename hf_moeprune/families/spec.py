"""Declarative description of where one MoE family keeps its router and experts.

A spec is data, not code: every algorithm reads expert weights through `MoELayer` (see `moe_layers.py`),
which interprets these fields. Adding a family means adding one `FamilySpec` to `builtin.py` (or calling
`register_family` from your own code); no method needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

UnitLayout = Literal["plain", "chunk2", "interleave2"]


@dataclass(frozen=True)
class ExpertTensor:
    """One weight (or bias) that every expert has, seen without its leading expert axis.

    Args:
        name: Attribute of the experts module holding the fused `[E, ...]` tensor, or for per-expert module
            layouts the dotted path inside each expert module (e.g. `"wi.weight"`).
        unit_axis: Axis indexing the expert's hidden units (intermediate neurons), or None when the tensor
            has no such axis (the output bias). Permutation alignment permutes this axis.
        unit_layout: How gate and up halves share `unit_axis`: `"plain"` (one unit per index), `"chunk2"`
            (gate half then up half) or `"interleave2"` (gate, up, gate, up, ...).
        in_axis: Axis of input features for a weight matrix (None for biases); Wanda scores use it.
        input_kind: What feeds this weight: the layer's `"hidden"` states or the expert's `"intermediate"`
            activations. Selects the input statistics used for Wanda scores.
    """

    name: str
    unit_axis: int | None
    unit_layout: UnitLayout = "plain"
    in_axis: int | None = None
    input_kind: Literal["hidden", "intermediate"] = "hidden"


# SwiGLU experts fused as `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (most transformers 5 families).
FUSED_SWIGLU = (
    ExpertTensor("gate_up_proj", unit_axis=0, unit_layout="chunk2", in_axis=1, input_kind="hidden"),
    ExpertTensor("down_proj", unit_axis=1, in_axis=1, input_kind="intermediate"),
)


@dataclass(frozen=True)
class FamilySpec:
    """Where routers and experts live in one model family.

    Args:
        name: Family name shown to users and written into checkpoints.
        model_types: `config.model_type` values this spec serves.
        moe_block_patterns: Module paths of candidate MoE blocks, `*` standing for a layer index. A
            candidate that lacks the router or experts child is a dense layer and is skipped.
        router: Path of the router module inside the block.
        router_tensors: Attributes of the router with a leading expert axis (weight, bias, correction
            bias); missing or None attributes are skipped.
        experts: Path of the experts module inside the block.
        expert_layout: `"fused"` (3-D parameters on the experts module) or `"modules"` (one child module
            per expert, named by `expert_module_name`).
        expert_tensors: The per-expert weights, see `ExpertTensor`.
        expert_module_name: Name template of per-expert children for the `"modules"` layout.
        routing_format: How the experts module receives routing: `"topk_index"` (hidden, top_k_index,
            top_k_weights) or `"onehot_mask"` (hidden, dispatch mask [T, k, E], weights [T, k]).
        num_experts_key: Config key of the routed-expert count.
        top_k_key: Config key of the number of experts per token (None for fixed top-1 routers).
        never_pruned: Block children that are not routed experts (shared experts); kept as they are.
        expert_groups_key: Config key of the number of expert groups for group-limited routing (DeepSeek's
            `n_group`): experts `[g*E/G, (g+1)*E/G)` form group g, so a plan must keep every new expert inside
            one original group, in group order, with the same count in every group.
        task: `"causal-lm"` or `"seq2seq-lm"`, the Auto class that loads the family.
    """

    name: str
    model_types: tuple[str, ...]
    moe_block_patterns: tuple[str, ...]
    router: str
    experts: str
    num_experts_key: str
    top_k_key: str | None
    expert_tensors: tuple[ExpertTensor, ...] = FUSED_SWIGLU
    router_tensors: tuple[str, ...] = ("weight", "bias")
    expert_layout: Literal["fused", "modules"] = "fused"
    expert_module_name: str = "expert_{}"
    routing_format: Literal["topk_index", "onehot_mask"] = "topk_index"
    never_pruned: tuple[str, ...] = ()
    expert_groups_key: str | None = None
    task: Literal["causal-lm", "seq2seq-lm"] = "causal-lm"
    extra: dict = field(default_factory=dict, compare=False)
