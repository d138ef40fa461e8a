"""NAEE: exhaustive search, per layer, for the experts whose removal least changes the layer's output.

Paper: Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models" (ACL 2024), https://arxiv.org/abs/2402.14800, code Lucky-Lance/Expert_Sparsity.
For each MoE layer, with the calibration inputs X of that layer (collected layer by layer, so they come
from the already pruned earlier layers) and its output Z = F(X), try every subset S of `n` experts to keep:
the reduced layer F_S (the same surgery the final model gets: router rows dropped, top-k renormalised as
the family does) gives Z_S, and the subset minimising ||Z - Z_S||_F is kept. C(E, n) subsets per layer: 28
or 70 for Mixtral's 8 experts; searches above `max_subsets` (default 10^4) per layer are refused before
any calibration.

Options: `max_subsets` (default 10000), `max_tokens` (calibration tokens used for the search, default 4096).

Example:
    >>> model.prune_experts(MoEPruneConfig(method="naee", experts_per_layer=6), calibration=texts)
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...calibration.sequential import SequentialPipeline, layer_output
from ...calibration.statistics import run_calibration
from ...moe_layers import MoELayer
from ...surgery import LayerPlan, ReductionPlan, apply_layer_plan
from ..base import ExpertMethod, MethodContext, MethodResult
from ..registry import register_method
from ..targets import uniform_counts
from ..unstructured.prune import has_decoder_layers


@torch.no_grad()
def search_layer(
    layer: MoELayer, inputs: torch.Tensor, keep: int, top_k: int | None = None
) -> tuple[list[int], float, int]:
    """Best subset of `keep` experts for one MoE block on `inputs` `[1, T, H]`: (subset, relative error, tried)."""
    reference = layer_output(layer.block(inputs)).float()
    scale = float(reference.norm()) or 1.0
    best: tuple[list[int], float] = ([], math.inf)
    tried = 0
    for subset in itertools.combinations(range(layer.num_experts), keep):
        trial = MoELayer(path=layer.path, block=copy.deepcopy(layer.block), spec=layer.spec)
        apply_layer_plan(trial, LayerPlan.keep(subset), top_k)
        error = float((layer_output(trial.block(inputs)).float() - reference).norm()) / scale
        tried += 1
        if error < best[1]:
            best = (list(subset), error)
    return best[0], best[1], tried


def _capture_block_inputs(layers: list[MoELayer], run: Callable[[], Any]) -> dict[str, list[torch.Tensor]]:
    captured: dict[str, list[torch.Tensor]] = {layer.path: [] for layer in layers}
    handles = [
        layer.block.register_forward_pre_hook(
            lambda module, args, path=layer.path: captured[path].append(
                args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        for layer in layers
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _sample(chunks: list[torch.Tensor], max_tokens: int) -> torch.Tensor:
    tokens = torch.cat(chunks)
    if tokens.shape[0] > max_tokens:
        index = torch.linspace(0, tokens.shape[0] - 1, max_tokens).long()
        tokens = tokens[index]
    return tokens.unsqueeze(0)


@dataclass
class NAEEOptions:
    max_subsets: int = 10_000
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_subsets", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} of method 'naee' must be at least 1, got {getattr(self, name)}.")


@register_method
class NAEE(ExpertMethod):
    name = "naee"
    pretty_name = "NAEE (exhaustive expert-subset search)"
    paper = "https://arxiv.org/abs/2402.14800"
    kind = "prune"
    Options = NAEEOptions

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)
        counts = uniform_counts(layers, self.config)
        limit = self.opts.max_subsets
        for layer in layers:
            subsets = math.comb(layer.num_experts, counts[layer.path])
            if subsets > limit:
                raise ValueError(
                    f"NAEE would try C({layer.num_experts}, {counts[layer.path]}) = {subsets:,} expert subsets in "
                    f"{layer.path}, above the limit of {limit:,}. Exhaustive search does not scale to this many "
                    "experts: use method='stun' (O(1) forward passes) or raise method_options max_subsets."
                )

    def run(self, context: MethodContext) -> MethodResult:
        counts = uniform_counts(context.layers, self.config)
        max_tokens = self.opts.max_tokens
        if context.calibration is None:
            raise ValueError("NAEE needs calibration data.")
        batches = context.calibration.batches
        plan = ReductionPlan(top_k=self.config.top_k)
        errors: dict[str, float] = {}
        evaluations = 0

        def decide(layer: MoELayer, chunks: list[torch.Tensor]) -> None:
            nonlocal evaluations
            subset, error, tried = search_layer(
                layer, _sample(chunks, max_tokens), counts[layer.path], self.config.top_k
            )
            plan.layers[layer.path] = LayerPlan.keep(subset)
            errors[layer.path] = round(error, 6)
            evaluations += tried

        if has_decoder_layers(context.model) and not context.is_encoder_decoder:
            pipeline = SequentialPipeline.from_model(context.model, batches)
            for step in pipeline:
                inside = [layer for layer in context.layers if layer.path.startswith(step.path + ".")]
                if not inside:
                    step.advance()
                    continue
                captured = _capture_block_inputs(inside, step.run)
                for layer in inside:
                    decide(layer, captured[layer.path])
                step.advance(self._pruned_outputs(step, inside, plan))
        else:  # encoder-decoder: one pass of the unpruned model
            captured = _capture_block_inputs(
                context.layers,
                lambda: run_calibration(
                    context.model, batches, is_encoder_decoder=context.is_encoder_decoder, progress=False
                ),
            )
            for layer in context.layers:
                decide(layer, captured[layer.path])
        context.forward_passes += len(batches)
        return MethodResult(plan=plan, details={"relative_error": errors, "block_evaluations": evaluations})

    def _pruned_outputs(self, step, inside: list[MoELayer], plan: ReductionPlan) -> list[torch.Tensor]:
        """The next layer's inputs from a pruned copy of this decoder layer (the real model is pruned later)."""
        pruned: nn.Module = copy.deepcopy(step.layer)
        for layer in inside:
            relative = layer.path[len(step.path) + 1 :]
            apply_layer_plan(
                MoELayer(path=layer.path, block=pruned.get_submodule(relative), spec=layer.spec),
                plan.layers[layer.path],
                self.config.top_k,
            )
        original, step.layer = step.layer, pruned
        try:
            return step.run()
        finally:
            step.layer = original
