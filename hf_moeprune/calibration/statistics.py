"""Routing and activation statistics per MoE layer, collected by hooks during calibration passes.

Only running sums are kept (never all hidden states), so memory is O(E * (H + I) + E^2) per layer whatever
the number of calibration tokens. Fused-expert families are observed through a registered experts function
that computes the same output as transformers' eager loop while recording per-expert inputs and outputs;
per-expert-module families (Switch) through forward hooks on each expert module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..moe_layers import MoELayer
from ..progress import progress_bars_disabled

RECORDING_IMPLEMENTATION = "moeprune_recording"


@dataclass
class LayerStatistics:
    """Running sums for one MoE layer over the calibration tokens.

    Attributes:
        tokens: Tokens that reached the router.
        counts: Routed tokens per expert `[E]` (each token counts once per expert it is sent to).
        prob_mass: Sum of softmax router probabilities per expert `[E]`.
        logit_sum, logit_gram: Sum and Gram matrix `[E, E]` of router-logit columns, from which cosine or
            correlation similarity between experts' routing follows without storing the logits.
        logit_sample: The first `max_logit_samples` router-logit rows `[n, E]`.
        coactivation: Tokens routed to both experts i and j `[E, E]`.
        output_norm_sum: Sum of ||f_e(x)||_2 over routed tokens `[E]`.
        gated_output_norm_sum: Sum of g_e(x) * ||f_e(x)||_2 over routed tokens (REAP saliency) `[E]`.
        prob_output_norm_sum: Sum of p_e(x) * ||f_e(x)||_2 over routed tokens, p the softmax over all
            router logits, not renormalised over the top-k (the REAP authors' gate) `[E]`.
        prob_pairs: Routed token-expert pairs whose softmax probability was known (every pair, where the
            family's router is hooked) `[E]`.
        output_sum: Sum of f_e(x) over routed tokens `[E, H]` (mean expert output for HC-SMoE).
        output_max: Largest |f_e(x)| entry seen `[E]` (super-expert detection).
        output_signed_max: Largest f_e(x) entry seen, at least 0 (the REAP authors' peak) `[E]`.
        input_sq: Sum of x^2 over routed tokens `[E, H]` (Wanda norms of the expert's inputs).
        intermediate_sq: Sum of a^2 of the expert's intermediate activations `[E, I]`.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    max_logit_samples: int = 2048
    tokens: int = 0
    counts: torch.Tensor = field(init=False)
    prob_mass: torch.Tensor = field(init=False)
    logit_sum: torch.Tensor = field(init=False)
    logit_gram: torch.Tensor = field(init=False)
    logit_sample: torch.Tensor = field(init=False)
    coactivation: torch.Tensor = field(init=False)
    output_norm_sum: torch.Tensor = field(init=False)
    gated_output_norm_sum: torch.Tensor = field(init=False)
    prob_output_norm_sum: torch.Tensor = field(init=False)
    prob_pairs: torch.Tensor = field(init=False)
    output_signed_max: torch.Tensor = field(init=False)
    output_sum: torch.Tensor = field(init=False)
    output_max: torch.Tensor = field(init=False)
    input_sq: torch.Tensor = field(init=False)
    intermediate_sq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.counts, self.prob_mass, self.logit_sum = z(e), z(e), z(e)
        self.logit_gram, self.coactivation = z(e, e), z(e, e)
        self.logit_sample = torch.zeros(0, e, dtype=torch.float32)
        self.output_norm_sum, self.gated_output_norm_sum, self.output_max = z(e), z(e), z(e)
        self.prob_output_norm_sum, self.prob_pairs, self.output_signed_max = z(e), z(e), z(e)
        self._probs: torch.Tensor | None = None
        self.output_sum, self.input_sq, self.intermediate_sq = z(e, h), z(e, h), z(e, i)

    def record_router(self, logits: torch.Tensor) -> None:
        logits = logits.detach().reshape(-1, self.num_experts).float()
        self.tokens += logits.shape[0]
        probs = logits.softmax(-1)
        self._probs = probs  # the current forward's tokens, read by record_experts
        self.prob_mass += probs.sum(0).double()
        self.logit_sum += logits.sum(0).double()
        self.logit_gram += (logits.T @ logits).double()
        room = self.max_logit_samples - self.logit_sample.shape[0]
        if room > 0:
            self.logit_sample = torch.cat([self.logit_sample, logits[:room].cpu()])

    def record_routing(self, top_k_index: torch.Tensor) -> None:
        index = top_k_index.detach().reshape(top_k_index.shape[0], -1).long()
        valid = (index >= 0) & (index < self.num_experts)
        one_hot = torch.zeros(index.shape[0], self.num_experts, dtype=torch.float32, device=index.device)
        # add, not write: a sentinel slot (-1, or E) clamped onto a chosen expert's column must not erase it
        one_hot.scatter_add_(1, index.clamp(0, self.num_experts - 1), valid.float())
        self.coactivation += (one_hot.T @ one_hot).double().cpu()

    def record_experts(
        self,
        experts: torch.Tensor,
        inputs: torch.Tensor,
        intermediate: torch.Tensor,
        outputs: torch.Tensor,
        gates: torch.Tensor,
        tokens: torch.Tensor | None = None,
    ) -> None:
        """Record token-expert pairs: `experts[s]` received input row s (token `tokens[s]` of this forward)
        and produced output row s.

        Per-expert sums are one matrix product with the one-hot assignment, not a loop over experts.
        """
        experts = experts.detach().long().reshape(-1)
        inputs, intermediate, outputs = inputs.detach().float(), intermediate.detach().float(), outputs.detach().float()
        assignment = torch.zeros(self.num_experts, experts.numel(), dtype=torch.float32, device=experts.device)
        assignment[experts, torch.arange(experts.numel(), device=experts.device)] = 1.0
        norms = torch.linalg.vector_norm(outputs, dim=-1)
        peaks = outputs.abs().amax(-1) if outputs.numel() else norms
        self.counts += assignment.sum(1).double().cpu()
        self.output_norm_sum += (assignment @ norms).double().cpu()
        self.gated_output_norm_sum += (assignment @ (norms * gates.detach().float().reshape(-1))).double().cpu()
        if tokens is not None and self._probs is not None and tokens.numel() and int(tokens.max()) < len(self._probs):
            probs = self._probs.to(experts.device)[tokens.long(), experts]
            self.prob_output_norm_sum += (assignment @ (norms * probs)).double().cpu()
            self.prob_pairs += assignment.sum(1).double().cpu()
        self.output_sum += (assignment @ outputs).double().cpu()
        self.input_sq += (assignment @ inputs.square()).double().cpu()
        self.intermediate_sq[:, : intermediate.shape[-1]] += (assignment @ intermediate.square()).double().cpu()
        signed = outputs.amax(-1) if outputs.numel() else norms
        for expert in torch.unique(experts).tolist():
            chosen = experts == expert
            self.output_max[expert] = max(float(self.output_max[expert]), float(peaks[chosen].max()))
            self.output_signed_max[expert] = max(float(self.output_signed_max[expert]), float(signed[chosen].max()))

    @property
    def frequency(self) -> torch.Tensor:
        """Share of routed assignments per expert (sums to 1 when any token was routed)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else self.counts.clone()

    def mean_output(self) -> torch.Tensor:
        return self.output_sum / self.counts.clamp(min=1).unsqueeze(-1)

    def router_logit_similarity(self, kind: str = "cosine") -> torch.Tensor:
        """Similarity `[E, E]` between experts' router-logit columns over the calibration tokens."""
        gram = self.logit_gram.clone()
        if kind == "correlation":
            n = max(self.tokens, 1)
            mean = self.logit_sum / n
            gram = gram / n - torch.outer(mean, mean)
        elif kind != "cosine":
            raise ValueError(f"Unknown similarity {kind!r}: use 'cosine' or 'correlation'.")
        scale = gram.diagonal().clamp(min=1e-12).sqrt()
        return gram / torch.outer(scale, scale)


class StatisticsCollector:
    """Installs the hooks on every MoE layer and accumulates a `LayerStatistics` per layer path."""

    def __init__(self, layers: Sequence[MoELayer], max_logit_samples: int = 2048) -> None:
        self.layers = list(layers)
        self.statistics: dict[str, LayerStatistics] = {}
        for layer in self.layers:
            tensors = layer.expert_tensors()
            hidden = int(layer.router_tensors()["weight"].shape[1])
            self.statistics[layer.path] = LayerStatistics(
                num_experts=layer.num_experts,
                hidden_size=hidden,
                intermediate_size=_intermediate_size(layer, tensors),
                max_logit_samples=max_logit_samples,
            )

    @contextmanager
    def recording(self) -> Iterator[dict[str, LayerStatistics]]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        swapped_configs: list[tuple[object, str]] = []
        try:
            for layer in self.layers:
                stats = self.statistics[layer.path]
                handles.append(layer.router.register_forward_pre_hook(_router_hook(layer, stats)))
                if layer.spec.expert_layout == "fused":
                    layer.experts._moeprune_recorder = stats
                    config = getattr(layer.experts, "config", None)
                    if config is None:
                        raise ValueError(f"{layer.experts_path} is not decorated with use_experts_implementation.")
                    if all(c is not config for c, _ in swapped_configs):
                        swapped_configs.append((config, config._experts_implementation))
                        config._experts_implementation = RECORDING_IMPLEMENTATION
                else:
                    handles += _install_module_hooks(layer, stats)
            yield self.statistics
        finally:
            for handle in handles:
                handle.remove()
            for config, previous in swapped_configs:
                config._experts_implementation = previous
            for layer in self.layers:
                if hasattr(layer.experts, "_moeprune_recorder"):
                    del layer.experts._moeprune_recorder


def _intermediate_size(layer: MoELayer, tensors: dict[str, torch.Tensor]) -> int:
    for spec in layer.expert_tensor_specs():
        if spec.input_kind == "intermediate" and spec.in_axis is not None:
            return int(tensors[spec.name].shape[1 + spec.in_axis])
    raise ValueError(f"{layer.path}: the family spec names no weight fed by intermediate activations.")


def _router_hook(layer: MoELayer, stats: LayerStatistics):
    def hook(module: nn.Module, args: tuple) -> None:
        hidden = args[0]
        tensors = layer.router_tensors()
        weight = tensors["weight"]
        logits = F.linear(hidden.reshape(-1, weight.shape[1]).float(), weight.float(), _router_bias(tensors))
        stats.record_router(logits)

    return hook


def _router_bias(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    bias = tensors.get("bias")
    return bias.float() if bias is not None else None


def _install_module_hooks(layer: MoELayer, stats: LayerStatistics) -> list:
    """Hooks for per-expert-module layouts: the dispatch mask tells which tokens each expert module gets."""
    state: dict[str, torch.Tensor] = {}
    handles = []

    def dispatch_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask, weights = args[1], args[2]
        mask = mask.reshape(mask.shape[0], -1, layer.num_experts)
        state["mask"], state["weights"] = mask, weights.reshape(mask.shape[0], -1)
        routed = mask.sum(1) > 0
        index = torch.where(routed.any(-1), routed.float().argmax(-1), torch.full_like(routed[:, 0], -1, dtype=torch.long))
        stats.record_routing(index.unsqueeze(-1))

    handles.append(layer.experts.register_forward_pre_hook(dispatch_hook, with_kwargs=True))
    intermediate_name = next(t.name for t in layer.expert_tensor_specs() if t.input_kind == "intermediate")
    intermediate_module = intermediate_name.rsplit(".", 1)[0]
    for e in range(layer.num_experts):
        expert = layer.expert_module(e)
        captured: dict[str, torch.Tensor] = {}
        handles.append(
            expert.get_submodule(intermediate_module).register_forward_pre_hook(
                lambda m, a, captured=captured: captured.__setitem__("a", a[0])
            )
        )

        def expert_hook(module: nn.Module, args: tuple, output: torch.Tensor, e: int = e, captured=captured) -> None:
            position, token = torch.where(state["mask"][:, :, e].T > 0)
            gates = state["weights"][token, position]
            experts = torch.full((args[0].shape[0],), e, dtype=torch.long, device=args[0].device)
            stats.record_experts(experts, args[0], captured.pop("a"), output, gates, token)

        handles.append(expert.register_forward_hook(expert_hook))
    return handles


def recording_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts computation, also feeding each expert's inputs and outputs to the recorder.

    Token-expert pairs are sorted by expert so each expert reads one contiguous slice, and the outputs are
    combined by a reshape-sum rather than `index_add_` (which dominated the time on CPU).
    """
    recorder: LayerStatistics | None = getattr(self, "_moeprune_recorder", None)
    if recorder is not None:
        recorder.record_routing(top_k_index)
    first = self.gate_up_proj if self.has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    num_experts = first.shape[0]
    num_tokens, top_k = top_k_index.shape
    flat_experts = top_k_index.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    tokens = order // top_k
    gates = top_k_weights.reshape(-1)[order]
    inputs = hidden_states[tokens]
    outputs = torch.zeros_like(inputs)
    raw_outputs = torch.zeros_like(inputs) if recorder is not None else None
    intermediates: list[torch.Tensor] = []
    bounds = torch.searchsorted(sorted_experts, torch.arange(num_experts + 1, device=sorted_experts.device)).tolist()
    for expert in range(num_experts):
        begin, end = bounds[expert], bounds[expert + 1]
        if begin == end:
            continue
        x = inputs[begin:end]
        h = _expert_linear(x, first[expert], first_bias[expert] if first_bias is not None else None, self.is_transposed)
        a = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        down_bias = self.down_proj_bias[expert] if self.has_bias else None
        y = _expert_linear(a, self.down_proj[expert], down_bias, self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        outputs[begin:end] = y * gates[begin:end].unsqueeze(-1)
        if recorder is not None:
            raw_outputs[begin:end] = y
            intermediates.append(a)
    if recorder is not None and intermediates:
        routed = slice(bounds[0], bounds[num_experts])
        recorder.record_experts(
            sorted_experts[routed], inputs[routed], torch.cat(intermediates), raw_outputs[routed], gates[routed],
            tokens[routed],
        )
    combined = torch.empty_like(outputs)
    combined[order] = outputs
    return combined.view(num_tokens, top_k, -1).sum(1).to(hidden_states.dtype)


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


def _register_recording_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if RECORDING_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(RECORDING_IMPLEMENTATION, recording_experts_forward)


@torch.no_grad()
def run_calibration(
    model: nn.Module, batches: Iterable[torch.Tensor], *, is_encoder_decoder: bool = False, progress: bool = True
) -> int:
    """Forward every batch through `model` (no cache, eval mode); returns the number of forward passes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    passes = 0
    try:
        bar_off = not progress or progress_bars_disabled()
        for batch in tqdm(list(batches), desc="calibration", disable=bar_off, unit="batch"):
            batch = batch.to(device)
            if is_encoder_decoder:
                model(input_ids=batch, decoder_input_ids=batch, use_cache=False)
            else:
                model(input_ids=batch, use_cache=False)
            passes += 1
    finally:
        model.train(was_training)
    return passes


def collect_statistics(
    model: nn.Module,
    layers: Sequence[MoELayer],
    batches: Iterable[torch.Tensor],
    *,
    is_encoder_decoder: bool = False,
    progress: bool = True,
    max_logit_samples: int = 2048,
) -> dict[str, LayerStatistics]:
    """Run the calibration batches once and return the statistics of every MoE layer, keyed by path."""
    _register_recording_implementation()
    collector = StatisticsCollector(layers, max_logit_samples=max_logit_samples)
    with collector.recording() as statistics:
        run_calibration(model, batches, is_encoder_decoder=is_encoder_decoder, progress=progress)
    return statistics
