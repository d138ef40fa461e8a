"""The cluster -> align -> merge pipeline shared by UNCURL, MC-SMoE and HC-SMoE.

Per MoE layer: (1) a similarity between experts from calibration statistics, (2) a clustering of the experts
into the layer's target count, (3) permutation alignment of each cluster's members to its anchor (the most-used
member), done in place (a permuted expert computes the same function, so the model is unchanged until the
merge), (4) a `LayerPlan` whose groups are merged by the shared surgery with routed-token weights. The three
registered methods differ only in their default options; every option can be overridden through
`MoEPruneConfig.method_options`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan, ReductionPlan
from ..base import ExpertMethod, MethodContext, MethodResult
from ..targets import effective_top_k, total_budget, uniform_counts
from .adaptive import frequency_counts, redundancy_counts
from .alignment import align_groups
from .clustering import CLUSTERINGS, cluster_experts
from .similarity import SIMILARITIES, expert_features, expert_similarity

logger = logging.getLogger(__name__)

OPTION_CHOICES: dict[str, tuple] = {
    "similarity": SIMILARITIES,
    "clustering": CLUSTERINGS,
    "linkage": ("average", "complete", "single", "ward"),
    "cluster_on": ("similarity", "features"),
    "alignment": ("weights", "activations", "none"),
    "alignment_solver": ("auto", "lapjv", "scipy"),
    "merge_weights": ("frequency", "prob-mass", "uniform"),
    "router_rows": ("weighted", "anchor"),
    "adaptive_by": ("redundancy", "frequency"),
}
FREE_OPTIONS = ("alignment_sketch", "alignment_tokens")


class ClusterMergeMethod(ExpertMethod):
    """Base of the cluster-and-merge methods (not registered itself). Subclasses set `defaults`."""

    kind = "merge"
    Options = None  # options checked against OPTION_CHOICES in `validate`, with per-method defaults
    defaults: ClassVar[dict[str, Any]] = {
        "similarity": "router-logits",
        "clustering": "spectral",
        "linkage": "average",
        "cluster_on": "similarity",
        "alignment": "weights",
        "alignment_solver": "auto",
        "alignment_sketch": "auto",
        "alignment_tokens": 512,
        "merge_weights": "frequency",
        "router_rows": "weighted",
        "adaptive_by": "redundancy",
    }

    @property
    def options(self) -> dict[str, Any]:
        return {**self.defaults, **self.config.method_options}

    def validate(self, layers: list[MoELayer]) -> None:
        super().validate(layers)
        unknown = sorted(set(self.config.method_options) - set(OPTION_CHOICES) - set(FREE_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for method {self.name!r}; "
                f"known: {', '.join(sorted(OPTION_CHOICES) + list(FREE_OPTIONS))}."
            )
        options = self.options
        for key, choices in OPTION_CHOICES.items():
            if options[key] not in choices:
                raise ValueError(
                    f"method_options[{key!r}]={options[key]!r}; use one of {', '.join(choices)}."
                )
        sketch = options["alignment_sketch"]
        if not (sketch in ("auto", None) or (isinstance(sketch, int) and sketch > 0)):
            raise ValueError(
                f"method_options['alignment_sketch'] must be 'auto', None or a positive int, got {sketch!r}."
            )
        if not (isinstance(options["alignment_tokens"], int) and options["alignment_tokens"] > 0):
            raise ValueError("method_options['alignment_tokens'] must be a positive int.")
        if self.config.adaptive:
            total_budget(layers, self.config)
        else:
            uniform_counts(layers, self.config)

    def target_counts(self, context: MethodContext, similarities: dict[str, torch.Tensor]) -> dict[str, int]:
        layers, config = context.layers, self.config
        if not config.adaptive:
            return uniform_counts(layers, config)
        budget = total_budget(layers, config)
        floors = {layer.path: effective_top_k(layer, config) for layer in layers}
        if self.options["adaptive_by"] == "frequency":
            stats = context.statistics()
            return frequency_counts(
                {layer.path: stats[layer.path].counts for layer in layers}, budget, floors
            )
        return redundancy_counts(similarities, budget, floors)

    def merge_weights(self, stats, group: list[int]) -> list[float]:
        kind = self.options["merge_weights"]
        if kind == "uniform":
            return [1.0] * len(group)
        source = stats.counts if kind == "frequency" else stats.prob_mass
        weights = [float(source[e]) for e in group]
        return weights if sum(weights) > 0 else [1.0] * len(group)

    @torch.no_grad()
    def run(self, context: MethodContext) -> MethodResult:
        options = self.options
        statistics = context.statistics()
        similarities = {
            layer.path: expert_similarity(statistics[layer.path], options["similarity"])
            for layer in context.layers
        }
        counts = self.target_counts(context, similarities)
        inputs = (
            _sample_layer_inputs(context, options["alignment_tokens"])
            if options["alignment"] == "activations"
            else {}
        )
        plan = ReductionPlan(top_k=self.config.top_k)
        details: dict[str, Any] = {"options": dict(options), "layers": {}}
        align_seconds = 0.0
        for layer in context.layers:
            stats, count = statistics[layer.path], counts[layer.path]
            if count >= layer.num_experts:
                continue
            use_features = options["clustering"] == "kmeans" or (
                options["clustering"] == "agglomerative" and options["cluster_on"] == "features"
            )
            groups = cluster_experts(
                similarities[layer.path],
                count,
                options["clustering"],
                frequency=stats.counts,
                features=expert_features(stats, options["similarity"]) if use_features else None,
                linkage=options["linkage"],
                seed=self.config.seed,
            )
            entry: dict[str, Any] = {"groups": groups}
            if options["alignment"] != "none":
                start = time.perf_counter()
                reports = align_groups(
                    layer,
                    groups,
                    mode=options["alignment"],
                    inputs=inputs.get(layer.path),
                    sketch_dim=options["alignment_sketch"],
                    solver=options["alignment_solver"],
                    seed=self.config.seed,
                )
                align_seconds += time.perf_counter() - start
                if reports:
                    before = sum(r.score_before for r in reports)
                    after = sum(r.score_after for r in reports)
                    entry["alignment_score_gain"] = round(after / before, 4) if before > 0 else None
                    entry["moved_units"] = sum(r.moved_units for r in reports)
            plan.layers[layer.path] = LayerPlan(
                groups=groups,
                weights=[self.merge_weights(stats, g) for g in groups],
                router_rows=options["router_rows"],
            )
            details["layers"][layer.path] = entry
        # wall-clock time goes to the log, not the record: config.json must be identical for the same inputs
        logger.info("%s: permutation alignment took %.3f s", self.name, align_seconds)
        return MethodResult(plan=plan, details=details)


@torch.no_grad()
def _sample_layer_inputs(context: MethodContext, max_tokens: int) -> dict[str, torch.Tensor]:
    """The first `max_tokens` hidden states entering each MoE block, from one extra pass over as few
    calibration batches as that takes."""
    from ...calibration import run_calibration

    if context.calibration is None:
        raise ValueError("alignment='activations' needs calibration data.")
    samples: dict[str, list[torch.Tensor]] = {layer.path: [] for layer in context.layers}
    handles = []
    for layer in context.layers:
        hidden = int(layer.router_tensors()["weight"].shape[1])

        def hook(module, args, path=layer.path, hidden=hidden):
            have = sum(t.shape[0] for t in samples[path])
            if have < max_tokens:
                samples[path].append(args[0].detach().reshape(-1, hidden)[: max_tokens - have].float().cpu())

        handles.append(layer.block.register_forward_pre_hook(hook))
    batches, tokens = [], 0
    for batch in context.calibration.batches:
        if tokens >= max_tokens:
            break
        batches.append(batch)
        tokens += batch.numel()
    try:
        context.forward_passes += run_calibration(
            context.model, batches, is_encoder_decoder=context.is_encoder_decoder, progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    return {path: torch.cat(parts) if parts else torch.empty(0) for path, parts in samples.items()}
