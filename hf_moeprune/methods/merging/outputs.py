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
def mean_expert_outputs(layer: MoELayer, inputs: torch.Tensor, rows_per_call: int = 32768) -> torch.Tensor:
    """`[E, H]` float64: expert e's output averaged over all rows of `inputs` `[T, H]` (no router weight).

    Computed by the model's own expert code in the model's dtype. Fused experts get one call per chunk with
    every token routed once to each expert (`rows_per_call` token-expert rows at most), since one call per
    expert costs a pass over all experts each time.
    """
    if layer.spec.expert_layout == "fused" and layer.spec.routing_format != "topk_index":
        raise ValueError(
            f"{layer.path}: expert outputs over all tokens need a top-k routed experts module; "
            "use method_options={'expert_output_tokens': 'routed'}."
        )
    parameter = next(layer.experts.parameters())
    num = layer.num_experts
    totals = torch.zeros(num, inputs.shape[-1], dtype=torch.float64)
    chunk = max(1, rows_per_call // num)
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start : start + chunk].to(device=parameter.device, dtype=parameter.dtype)
        if layer.spec.expert_layout == "modules":
            for expert in range(num):
                totals[expert] += layer.expert_module(expert)(x).double().sum(0).cpu()
            continue
        index = torch.arange(num, device=x.device).repeat_interleave(x.shape[0]).unsqueeze(-1)
        weights = torch.ones(index.shape, dtype=x.dtype, device=x.device)
        outputs = layer.experts(x.repeat(num, 1), index, weights)
        totals += outputs.view(num, x.shape[0], -1).double().sum(1).cpu()
    return totals / max(inputs.shape[0], 1)
