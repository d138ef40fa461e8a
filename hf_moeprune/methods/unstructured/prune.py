"""Wanda / OWL / N:M pruning of a model's weights, layer by layer, for MoE and dense models alike.

Expert weights are read through the family spec (`ExpertTensor.in_axis`, `input_kind`): an expert's inputs
are the tokens routed to it (hidden states for the first projection, its own intermediate activations for
the down projection), taken from the shared statistics collector. Other `nn.Linear` modules (attention, a
dense or residual MLP, shared experts; every linear of a dense model) and routers (not `nn.Linear` in
transformers 5, but a `[E, H]` weight applied to every token) use plain input norms over all tokens.
Embeddings and the LM head are never pruned. Zeros are written into the weights, so the checkpoint stays a
normal dense safetensors file that loads anywhere.

Example:
    >>> report = wanda_prune_(model, batches, 0.5)                      # dense SmolLM2 / Llama
    >>> report = unstructured_prune_(model, batches, UnstructuredOptions(0.5, "owl"), moe_layers=layers)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ...calibration.statistics import LayerStatistics
from ...families import ExpertTensor
from ...moe_layers import MoELayer
from ..base import Needs, UnitResult
from .masks import nm_prune_mask, owl_layer_sparsities, row_prune_mask, wanda_scores

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit

ModuleFilter = Callable[[nn.Module, str], bool]
TARGET_KINDS = ("experts", "router", "attention", "dense_mlp", "all_linear")
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)


@dataclass
class UnstructuredOptions:
    """How to zero weights.

    Args:
        sparsity: Share of weights zeroed in every pruned matrix (average over layers for OWL).
        algorithm: `"wanda"` (same sparsity everywhere) or `"owl"` (per-layer sparsity from outlier shares).
        nm: `(N, M)`: keep N of every M consecutive input weights (implies sparsity 1 - N/M; Wanda only).
        targets: Which weights: `"experts"` (routed experts), `"router"` (the MoE routers' weights),
            `"attention"`, `"dense_mlp"` (non-expert MLPs such as Arctic's residual MLP or shared experts),
            `"all_linear"` (all of these: every linear of the decoder layer, as the reference's `find_layers`
            in STUN `OWL/lib/prune_all.py` l.60-79; the choice for dense models).
        module_filter: `filter(module, fqn) -> bool` for non-expert, non-router linears, overriding the kind
            rules.
        owl_m: OWL's outlier threshold M (scores above M times the layer mean); 3 is the authors' code
            default (luuyin/OWL `main.py` l.265-267), their README commands use 5.
        owl_lambda: OWL's lambda: layer sparsities lie within target +- lambda (code default 0.08).
        owl_balance: `"mean"` (the authors': the plain mean of the layer sparsities is the target) or
            `"size_weighted"` (the share of zeros over all pruned weights is the target; prefer it after
            STUN's non-uniform first phase, where layers differ in size).
        sequential: Collect each layer's inputs after the earlier layers are pruned (True), or everything in
            one pass of the unpruned model (False; used automatically for encoder-decoder models).
    """

    sparsity: float
    algorithm: Literal["wanda", "owl"] = "wanda"
    nm: tuple[int, int] | None = None
    targets: tuple[str, ...] = ("experts",)
    module_filter: ModuleFilter | None = None
    owl_m: float = 3.0
    owl_lambda: float = 0.08
    owl_balance: Literal["mean", "size_weighted"] = "mean"
    sequential: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ("wanda", "owl"):
            raise ValueError(f"Unknown unstructured algorithm {self.algorithm!r}: use 'wanda' or 'owl'.")
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(TARGET_KINDS))
        if unknown:
            raise ValueError(f"Unknown prune targets {unknown}; choose from {TARGET_KINDS}.")
        if self.nm is not None:
            n, m = self.nm
            if self.algorithm == "owl":
                raise ValueError(
                    "N:M patterns fix the sparsity of every group; use algorithm='wanda' with nm."
                )
            self.sparsity = 1.0 - n / m
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}.")


@dataclass
class UnstructuredReport:
    """What was done: achieved sparsity per weight, requested sparsity and outlier share per layer."""

    weight_sparsity: dict[str, float] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    outlier_ratios: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0

    def details(self) -> dict[str, Any]:
        pruned = self.weight_sparsity
        return {
            "layer_sparsity": {k: round(v, 5) for k, v in self.layer_sparsity.items()},
            **(
                {"outlier_ratios": {k: round(v, 6) for k, v in self.outlier_ratios.items()}}
                if self.outlier_ratios
                else {}
            ),
            "mean_weight_sparsity": round(sum(pruned.values()) / len(pruned), 5) if pruned else 0.0,
        }


# --------------------------------------------------------------------------------------------- targets


@dataclass
class _Targets:
    """The weights of one group (a decoder layer) to prune: experts, routers (of these MoE layers), linears."""

    moe: list[MoELayer]
    routers: list[MoELayer]
    linears: dict[str, nn.Linear]

    def empty(self) -> bool:
        return not self.moe and not self.routers and not self.linears

    def observed_modules(self) -> dict[str, nn.Module]:
        """The modules whose inputs give the plain input norms: the linears and the routers."""
        return {**self.linears, **{layer.router_path: layer.router for layer in self.routers}}


def _linear_kind(relative: str) -> str:
    return "attention" if _ATTENTION.search(relative) else "dense_mlp"


def _group_targets(
    root: nn.Module, root_path: str, moe_layers: Sequence[MoELayer], options: UnstructuredOptions
) -> _Targets:
    """Targets inside module `root` (at `root_path`): the experts of `moe_layers` (the unit's own) and the chosen
    linears."""
    prefix = f"{root_path}." if root_path else ""
    moe = list(moe_layers)
    skip = [layer.experts_path for layer in moe] + [layer.router_path for layer in moe]
    linears: dict[str, nn.Linear] = {}
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        fqn = prefix + name
        if any(fqn == s or fqn.startswith(s + ".") for s in skip):
            continue
        if options.module_filter is not None:
            chosen = options.module_filter(module, fqn)
        else:
            chosen = "all_linear" in options.targets or _linear_kind(name) in options.targets
        if chosen:
            linears[fqn] = module
    def wanted(kind: str) -> bool:
        return kind in options.targets or "all_linear" in options.targets

    return _Targets(moe=moe if wanted("experts") else [], routers=moe if wanted("router") else [], linears=linears)


def _live_expert_weight(layer: MoELayer, spec: ExpertTensor, expert: int) -> torch.Tensor:
    """The stored weight of one expert (a view into the fused tensor, or the expert module's parameter)."""
    if layer.spec.expert_layout == "fused":
        return getattr(layer.experts, spec.name).data[expert]
    return layer.expert_module(expert).get_parameter(spec.name).data


def _expert_norm(stats: LayerStatistics, spec: ExpertTensor, expert: int, size: int) -> torch.Tensor:
    sq = stats.input_sq if spec.input_kind == "hidden" else stats.intermediate_sq
    return sq[expert, :size].clamp(min=0).sqrt()


# ----------------------------------------------------------------------------------------- observe/score


@dataclass
class _Observed:
    expert_stats: dict[str, LayerStatistics]
    linear_sq: dict[str, torch.Tensor]


def _scored_weights(
    targets: _Targets, observed: _Observed
) -> Iterable[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(report key, live weight, score, in_axis) for every target weight (one entry per expert)."""
    for layer in targets.moe:
        stats = observed.expert_stats[layer.path]
        for spec in layer.expert_tensor_specs():
            if spec.in_axis is None:
                continue  # biases are kept
            for e in range(layer.num_experts):
                weight = _live_expert_weight(layer, spec, e)
                norm = _expert_norm(stats, spec, e, weight.shape[spec.in_axis])
                yield (
                    f"{layer.experts_path}.{spec.name}",
                    weight,
                    wanda_scores(weight, norm, spec.in_axis),
                    spec.in_axis,
                )
    weights = {path: module.weight.data for path, module in targets.linears.items()}
    weights.update({layer.router_path: layer.router_tensors()["weight"].data for layer in targets.routers})
    for path, weight in weights.items():
        norm = observed.linear_sq[path].clamp(min=0).sqrt()
        yield path, weight, wanda_scores(weight, norm, 1), 1


def _outlier_ratio(targets: _Targets, observed: _Observed, m: float) -> tuple[float, int]:
    """OWL's share of scores above M times the group's mean score, and the number of weights."""
    total, count = 0.0, 0
    for _, _, score, _ in _scored_weights(targets, observed):
        total += float(score.sum(dtype=torch.float64))
        count += score.numel()
    if count == 0:
        return 0.0, 0
    threshold = m * total / count
    outliers = sum(int((score > threshold).sum()) for _, _, score, _ in _scored_weights(targets, observed))
    return outliers / count, count


@torch.no_grad()
def _prune_group(
    targets: _Targets, observed: _Observed, sparsity: float, nm: tuple[int, int] | None
) -> dict[str, float]:
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for key, weight, score, in_axis in _scored_weights(targets, observed):
        mask = nm_prune_mask(score, *nm, in_axis) if nm else row_prune_mask(score, sparsity, in_axis)
        weight.masked_fill_(mask.to(weight.device), 0)
        zeros[key] = zeros.get(key, 0) + int((weight == 0).sum())
        sizes[key] = sizes.get(key, 0) + weight.numel()
    return {key: zeros[key] / sizes[key] for key in zeros}


# ------------------------------------------------------------------------------------------ the method


class WeightPruning:
    """Wanda / OWL / N:M as pipeline hooks: the `wanda` and `owl` methods and STUN's second phase.

    Each decoder layer is one group: its experts (inputs = the tokens routed to each expert) and the chosen
    linears (plain input norms). OWL's layer sparsities come from every layer's outlier share on the
    unpruned model, a global decision; the pruning sweep then runs sequentially unless `sequential=False`.
    """

    config = None

    def __init__(self, options: UnstructuredOptions, name: str | None = None) -> None:
        self.options = options
        self.name = name or options.algorithm
        self.report = UnstructuredReport()

    @property
    def details(self) -> dict[str, Any]:
        return self.report.details()

    @property
    def needs(self) -> Needs:
        return Needs(
            statistics=True,
            linear_inputs=True,
            sequential=self.options.sequential,
            global_decision=self.options.algorithm == "owl",
        )

    def linear_targets(self, unit: Unit) -> dict[str, nn.Module]:
        """The modules whose input norms are observed: the chosen linears and routers."""
        return _group_targets(unit.module, unit.path, unit.moe_layers, self.options).observed_modules()

    def summarize(self, unit: Unit, observation: Observation) -> tuple[float, int, Observation]:
        """OWL's outlier share and size of the layer (and the observation, for a one-shot pruning sweep)."""
        targets = _group_targets(unit.module, unit.path, unit.moe_layers, self.options)
        return (*_outlier_ratio(targets, _observed(observation), self.options.owl_m), observation)

    def decide(self, summaries: dict[str, tuple] | None, layers: list[MoELayer]) -> dict[str, float] | None:
        if summaries is None:
            return None
        pruned = [path for path, (_, size, _) in summaries.items() if size > 0]
        values = owl_layer_sparsities(
            [summaries[p][0] for p in pruned], self.options.sparsity, self.options.owl_lambda,
            [summaries[p][1] for p in pruned] if self.options.owl_balance == "size_weighted" else None,
        )
        self.report.outlier_ratios = {p: summaries[p][0] for p in pruned}
        return dict(zip(pruned, values, strict=True))

    def reduce(self, unit: Unit, observation: Observation | tuple, sparsities: dict[str, float] | None) -> UnitResult:
        targets = _group_targets(unit.module, unit.path, unit.moe_layers, self.options)
        if targets.empty():
            return UnitResult()
        if isinstance(observation, tuple):  # OWL one-shot: the first sweep's observation
            observation = observation[2]
        sparsity = (sparsities or {}).get(unit.path, self.options.sparsity)
        achieved = _prune_group(targets, _observed(observation), sparsity, self.options.nm)
        self.report.weight_sparsity.update(achieved)
        self.report.layer_sparsity[unit.path] = sparsity
        return UnitResult(weight_sparsity=achieved)


def _observed(observation: Observation) -> _Observed:
    return _Observed(expert_stats=observation.statistics, linear_sq=observation.linear_sq)


# ---------------------------------------------------------------------------------------------- drivers


@torch.no_grad()
def unstructured_prune_(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    options: UnstructuredOptions,
    moe_layers: Sequence[MoELayer] | None = None,
    progress: bool = False,
) -> UnstructuredReport:
    """Zero weights of `model` in place with Wanda or OWL; returns the report (achieved sparsity per weight).

    Args:
        model: A transformers causal LM (MoE or dense) or, one-shot, an encoder-decoder.
        batches: Calibration `input_ids` batches.
        options: See `UnstructuredOptions`.
        moe_layers: The model's MoE layers (from its family spec); None for a dense model.
    """
    from ...pipeline.runner import run_method
    from ...pipeline.sources import InMemorySource

    source = InMemorySource(model, list(moe_layers or []))
    if not source.layerwise:
        options = UnstructuredOptions(**{**options.__dict__, "sequential": False})
    method = WeightPruning(options)
    step = run_method(source, method, list(batches), progress=progress)
    method.report.forward_passes = step.forward_passes
    return method.report


def _default_targets(targets: Sequence[str] | None, moe_layers: Sequence[MoELayer] | None) -> tuple[str, ...]:
    """The targets asked for, else the experts of an MoE model or every decoder linear of a dense one."""
    return tuple(targets) if targets else (("experts",) if moe_layers else ("all_linear",))


def wanda_prune_(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    targets: Sequence[str] | None = None,
    moe_layers: Sequence[MoELayer] | None = None,
    **options: Any,
) -> UnstructuredReport:
    """Wanda in place. Dense models (no `moe_layers`) prune every decoder linear by default."""
    targets = _default_targets(targets, moe_layers)
    return unstructured_prune_(
        model, batches, UnstructuredOptions(sparsity, "wanda", nm=nm, targets=targets, **options), moe_layers
    )


def owl_prune_(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    sparsity: float,
    *,
    targets: Sequence[str] | None = None,
    moe_layers: Sequence[MoELayer] | None = None,
    **options: Any,
) -> UnstructuredReport:
    """OWL (outlier-weighted layer-wise sparsity + Wanda scores) in place."""
    targets = _default_targets(targets, moe_layers)
    return unstructured_prune_(
        model, batches, UnstructuredOptions(sparsity, "owl", targets=targets, **options), moe_layers
    )


def options_from_config(config: Any, algorithm: str, options: Any) -> UnstructuredOptions:
    """`UnstructuredOptions` from a `MoEPruneConfig` (weight_sparsity, nm_pattern) and a method's parsed
    options (`targets`, `sequential`; for OWL also `owl_m`, `owl_lambda`, `owl_balance`), so each method's
    own defaults apply (STUN's phase 2 prunes every linear, the `wanda` / `owl` methods the experts)."""
    defaults = UnstructuredOptions(0.0)
    return UnstructuredOptions(
        sparsity=config.weight_sparsity if config.weight_sparsity is not None else 0.0,
        algorithm=algorithm,
        nm=config.nm_pattern,
        targets=tuple(options.targets),
        owl_m=getattr(options, "owl_m", defaults.owl_m),
        owl_lambda=getattr(options, "owl_lambda", defaults.owl_lambda),
        owl_balance=getattr(options, "owl_balance", defaults.owl_balance),
        sequential=options.sequential,
    )
