"""The cluster -> align -> merge pipeline shared by UNCURL, MC-SMoE and HC-SMoE.

Per MoE layer: (1) a similarity between experts from calibration statistics, (2) a clustering of the experts
into the layer's target count, (3) permutation alignment of each cluster's members to its anchor (the most-used
member), done in place (a permuted expert computes the same function, so the model is unchanged until the
merge), (4) a `LayerPlan` whose groups are merged by the shared surgery with routed-token weights. The three
registered methods differ only in their default options (and MC-SMoE in when its counts are global); every
option can be overridden through `MoEPruneConfig.method_options`. Under group-limited routing each routing
group is clustered on its own into `count / G` clusters, so merges stay inside a group and every group keeps
the same count.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...moe_layers import MoELayer
from ...surgery import LayerPlan
from ..base import ExpertMethod, Needs, UnitResult
from ..targets import effective_top_k, expert_groups, total_budget, uniform_counts
from .adaptive import frequency_counts, redundancy_counts
from .alignment import align_groups
from .clustering import CLUSTERINGS, cluster_experts
from .outputs import mean_expert_outputs
from .similarity import SIMILARITIES, expert_features, expert_similarity

if TYPE_CHECKING:
    from ...pipeline import Observation, Unit

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
    "router": ("folded", "tied"),
    "adaptive_by": ("redundancy", "frequency"),
    "expert_output_tokens": ("all", "routed"),
}
BOOL_OPTIONS = ("uniform", "exact_budget")
FREE_OPTIONS = ("alignment_sketch", "alignment_tokens", *BOOL_OPTIONS)


class ClusterMergeMethod(ExpertMethod):
    """Base of the cluster-and-merge methods (not registered itself). Subclasses set `defaults`."""

    kind = "merge"
    group_aware = True
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
        "router": "folded",
        "adaptive_by": "redundancy",
        "expert_output_tokens": "all",
        "uniform": False,
        "exact_budget": False,
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
        for key in BOOL_OPTIONS:
            if not isinstance(options[key], bool):
                raise ValueError(f"method_options[{key!r}] must be true or false, got {options[key]!r}.")
        if options["router"] == "tied":
            untied = sorted({layer.spec.name for layer in layers if layer.spec.routing_format != "topk_index"})
            if untied:
                raise ValueError(
                    f"Family {untied[0]!r} does not pass top-k indices to its experts, so a tied router cannot be "
                    "mapped; use router='folded'."
                )
        if options["uniform"] and self.config.adaptive:
            raise ValueError("method_options uniform=True asks for one count per layer, adaptive=True for "
                             "per-layer counts; drop one of them.")
        if self.global_counts:
            total_budget(layers, self.config)
        else:
            uniform_counts(layers, self.config)

    @property
    def global_counts(self) -> bool:
        """Per-layer counts from one global decision (`adaptive=True`) rather than the same count everywhere."""
        return self.config.adaptive

    @property
    def all_token_outputs(self) -> bool:
        """Whether the similarity needs every expert's output on every calibration token (HC-SMoE's feature)."""
        return self.options["similarity"] == "expert-output" and self.options["expert_output_tokens"] == "all"

    @property
    def needs(self) -> Needs:
        return Needs(
            statistics=True,
            block_inputs=self.options["alignment"] == "activations" or self.all_token_outputs,
            global_decision=self.global_counts,
        )

    def summarize(self, unit: Unit, observation: Observation) -> dict[str, tuple]:
        """Per MoE layer: its statistics, expert similarity, all-token mean expert outputs (when the similarity
        uses them) and (for activation alignment) sampled inputs."""
        tokens = self.options["alignment_tokens"]
        summary = {}
        for layer in unit.moe_layers:
            stats, inputs = observation.statistics[layer.path], observation.block_inputs.get(layer.path)
            outputs = mean_expert_outputs(layer, inputs) if self.all_token_outputs else None
            alignment_inputs = inputs[:tokens] if self.options["alignment"] == "activations" else None
            summary[layer.path] = (
                stats, expert_similarity(stats, self.options["similarity"], outputs), outputs, alignment_inputs
            )
        return summary

    def decide(self, summaries: dict[str, dict] | None, layers: list[MoELayer]) -> dict[str, int]:
        self.details = {"options": dict(self.options), "layers": {}}
        config = self.config
        if not self.global_counts:
            return uniform_counts(layers, config)
        entries = {path: entry for unit in summaries.values() for path, entry in unit.items()}
        budget = total_budget(layers, config)
        floors = {layer.path: effective_top_k(layer, config) for layer in layers}
        if self.options["adaptive_by"] == "frequency":
            counts = frequency_counts({path: entry[0].counts for path, entry in entries.items()}, budget, floors,
                                      exact=self.options["exact_budget"])
        else:
            counts = redundancy_counts({path: entry[1] for path, entry in entries.items()}, budget, floors)
        self.details.update(experts_per_layer=counts, budget=budget)
        if sum(counts.values()) < budget:
            logger.info("%s: shares tied at the frequency threshold keep %d experts of the %d budgeted "
                        "(method_options exact_budget=True fills the budget)", self.name, sum(counts.values()), budget)
        return counts

    def merge_weights(self, stats, group: list[int]) -> list[float]:
        kind = self.options["merge_weights"]
        if kind == "uniform":
            return [1.0] * len(group)
        source = stats.counts if kind == "frequency" else stats.prob_mass
        weights = [float(source[e]) for e in group]
        return weights if sum(weights) > 0 else [1.0] * len(group)

    @torch.no_grad()
    def reduce(self, unit: Unit, observation: Observation | dict, counts: dict[str, int]) -> UnitResult:
        options = self.options
        summary = observation if self.global_counts else self.summarize(unit, observation)
        result = UnitResult()
        for layer in unit.moe_layers:
            stats, similarity, outputs, inputs = summary[layer.path]
            count = counts[layer.path]
            if count >= layer.num_experts:
                continue
            use_features = options["clustering"] == "kmeans" or (
                options["clustering"] == "agglomerative" and options["cluster_on"] == "features"
            )
            features = expert_features(stats, options["similarity"], outputs) if use_features else None
            routing_groups = expert_groups(layer)
            groups = []
            for members in routing_groups:
                index = torch.tensor(members)
                local = cluster_experts(
                    similarity[index][:, index],
                    count // len(routing_groups),
                    options["clustering"],
                    frequency=stats.counts[index],
                    features=features[index] if features is not None else None,
                    linkage=options["linkage"],
                    seed=self.config.seed,
                )
                groups += [[members[i] for i in group] for group in local]
            entry: dict[str, Any] = {"groups": groups}
            if options["alignment"] != "none":
                start = time.perf_counter()
                reports = align_groups(
                    layer,
                    groups,
                    mode=options["alignment"],
                    inputs=inputs.to(layer.router_tensors()["weight"].device) if inputs is not None else None,
                    sketch_dim=options["alignment_sketch"],
                    solver=options["alignment_solver"],
                    seed=self.config.seed,
                )
                # wall-clock time goes to the log, not the record: config.json must be identical for the same inputs
                logger.info("%s: permutation alignment of %s took %.3f s", self.name, layer.path,
                            time.perf_counter() - start)
                if reports:
                    before = sum(r.score_before for r in reports)
                    after = sum(r.score_after for r in reports)
                    entry["alignment_score_gain"] = round(after / before, 4) if before > 0 else None
                    entry["moved_units"] = sum(r.moved_units for r in reports)
            result.plans[layer.path] = LayerPlan(
                groups=groups,
                weights=[self.merge_weights(stats, g) for g in groups],
                router_rows=options["router_rows"],
                tied_router=options["router"] == "tied",
            )
            self.details["layers"][layer.path] = entry
        return result
