"""Each expert's output averaged over every calibration token, as HC-SMoE describes an expert.

HC-SMoE pushes every token of a layer through every expert, routed to it or not, and averages
(wazenmai/HC-SMoE `hcsmoe/merging/grouping_mixtral.py` `group_experts_by_clustering_output`, l.452-458). The
routing statistics only see each expert's routed tokens, so this runs the layer's own experts on its
calibration inputs once more: E times the expert compute of one forward over those tokens.
"""

from __future__ import annotations

import torch

from ...moe_layers import MoELayer


@torch.no_grad()
def mean_expert_outputs(layer: MoELayer, inputs: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """`[E, H]` float64: expert e's output averaged over all rows of `inputs` `[T, H]` (no router weight).

    Computed by the model's own expert code, in the model's dtype, `chunk_tokens` rows at a time.
    """
    if layer.spec.expert_layout == "fused" and layer.spec.routing_format != "topk_index":
        raise ValueError(
            f"{layer.path}: expert outputs over all tokens need a top-k routed experts module; "
            "use method_options={'expert_output_tokens': 'routed'}."
        )
    parameter = next(layer.experts.parameters())
    totals = torch.zeros(layer.num_experts, inputs.shape[-1], dtype=torch.float64)
    for start in range(0, inputs.shape[0], chunk_tokens):
        x = inputs[start : start + chunk_tokens].to(device=parameter.device, dtype=parameter.dtype)
        for expert in range(layer.num_experts):
            totals[expert] += _expert_output(layer, expert, x).double().sum(0).cpu()
    return totals / max(inputs.shape[0], 1)


def _expert_output(layer: MoELayer, expert: int, x: torch.Tensor) -> torch.Tensor:
    if layer.spec.expert_layout == "modules":
        return layer.expert_module(expert)(x)
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long, device=x.device)
    return layer.experts(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))
