"""The contract every expert method follows: declare what calibration it needs, decide, return plans.

A method never runs the model. The calibration pipeline (`hf_moeprune.pipeline`) owns the passes: it walks
the model one decoder layer (a `Unit`) at a time, in memory or streamed from safetensors shards, collects
what `needs` asks for, and calls the hooks:

1. `summarize(unit, observation)` on every unit, when `needs.global_decision` (a first pass);
2. `decide(summaries, layers)` once, before any layer changes (per-layer counts, global thresholds);
3. `reduce(unit, observation, decision)` on every unit: returns the `LayerPlan` of each MoE layer in it
   (applied by the shared surgery) and may zero weights inside the unit (Wanda, OWL).

Methods with two phases (STUN: experts, then weights) return the second phase from `second_phase()`;
the pipeline runs it as another step on the reduced model and records both as one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..config import MoEPruneConfig
from ..moe_layers import MoELayer
from ..surgery import LayerPlan
from .options import NoOptions, normalised, parse_options
from .targets import describe_groups

if TYPE_CHECKING:
    from torch import nn

    from ..pipeline.observe import Observation
    from ..pipeline.units import Unit


@dataclass(frozen=True)
class Needs:
    """What the pipeline must collect for a method.

    Attributes:
        statistics: Routing and per-expert statistics of every MoE layer (`LayerStatistics`).
        block_inputs: The hidden states entering each MoE block (`[T, H]`, all calibration tokens).
        linear_inputs: Input norms of the linears `ExpertMethod.linear_targets` names (Wanda on attention).
        sequential: Observe each layer on the outputs of the already-reduced layers before it (Wanda, NAEE);
            otherwise every observation is of the original model.
        global_decision: `decide` needs every layer's summary first, so the pipeline makes two passes.
        summary_weights: What the first pass of a global decision reads: `"all"` or `"router"` (the
            data-free STUN distance needs the router rows only, so streaming skips the expert tensors).
    """

    statistics: bool = False
    block_inputs: bool = False
    linear_inputs: bool = False
    sequential: bool = False
    global_decision: bool = False
    summary_weights: Literal["all", "router"] = "all"

    @property
    def calibration(self) -> bool:
        return self.statistics or self.block_inputs or self.linear_inputs


@dataclass
class UnitResult:
    """What `reduce` did to one unit: expert plans per MoE layer path and achieved weight sparsity."""

    plans: dict[str, LayerPlan] = field(default_factory=dict)
    weight_sparsity: dict[str, float] = field(default_factory=dict)


class ExpertMethod:
    """Base class of registered methods. Subclasses set the class attributes and implement the hooks.

    Attributes:
        name: Registry key used in `MoEPruneConfig(method=...)`.
        pretty_name: Name shown in model cards.
        paper: Link to the method's paper (None for plain baselines).
        kind: `"prune"` (removes experts), `"merge"` (merges experts) or `"unstructured"` (zeros weights).
        unstructured_phase: True for expert methods that also zero weights (STUN); the others refuse
            `weight_sparsity` / `unstructured` / `nm_pattern` instead of silently dropping them.
        Options: dataclass of the method's `method_options`; parsed into `self.opts` when the method is built,
            so unknown keys and wrong types fail before any weights are read.
        details: What the method records about its decisions (written into the checkpoint's record).
        group_aware: True when the method's plans keep the expert groups of group-limited routing equal
            (`targets.keep_per_group`, clusters inside one group); expert methods without it refuse such
            models before any calibration, since the surgery would refuse their plans only afterwards.
    """

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    paper: ClassVar[str | None] = None
    kind: ClassVar[Literal["prune", "merge", "unstructured"]] = "prune"
    unstructured_phase: ClassVar[bool] = False
    group_aware: ClassVar[bool] = False
    Options: ClassVar[type | None] = NoOptions

    def __init__(self, config: MoEPruneConfig) -> None:
        self.config = config
        self.details: dict[str, Any] = {}
        asked = [
            name for name in ("weight_sparsity", "unstructured", "nm_pattern") if getattr(config, name) is not None
        ]
        if asked and self.kind != "unstructured" and not self.unstructured_phase:
            # refused rather than ignored: the card would otherwise claim weights were pruned
            raise ValueError(
                f"Method {self.name!r} has no unstructured phase, so {', '.join(asked)} cannot be honoured; "
                "use method='stun' (experts, then weights) or run 'wanda'/'owl' as a second step."
            )
        if self.Options is not None:  # None: the method checks its own options (the merging pipeline)
            self.opts = parse_options(self.Options, config.method_options, self.name)
            config.method_options = normalised(self.opts, config.method_options)

    @property
    def needs(self) -> Needs:
        """Routing statistics of the original model, one decision per layer; override to ask for more."""
        return Needs(statistics=True)

    @property
    def needs_calibration(self) -> bool:
        """Whether the step (second phase included) needs calibration data."""
        phase = self.second_phase()
        return self.needs.calibration or (phase is not None and phase.needs.calibration)

    def validate(self, layers: list[MoELayer]) -> None:
        """Raise a ValueError before any calibration when the request cannot work on these layers."""
        if self.kind != "unstructured" and not self.config.has_expert_target:
            raise ValueError(
                f"Method {self.name!r} needs an expert target: experts_per_layer, expert_sparsity or num_experts_total."
            )
        tied = [layer.path for layer in layers if layer.expert_map is not None]
        if tied:  # statistics and per-expert inputs would be indexed by router rows, not by experts
            raise ValueError(
                f"{tied[0]} was merged with a tied router, so it cannot be reduced again; start from a "
                "merge with method_options={'router': 'folded'} (the family's native architecture)."
            )
        grouped = [layer for layer in layers if layer.num_expert_groups > 1]
        if grouped and self.kind != "unstructured" and not self.group_aware:
            from .registry import registered_methods  # the registry imports this module

            aware = sorted(name for name, cls in registered_methods().items() if cls.group_aware)
            raise ValueError(
                f"Method {self.name!r} does not keep the expert groups of group-limited routing equal "
                f"({grouped[0].path}, {describe_groups(grouped[0])}); use one of {', '.join(aware)}."
            )

    def linear_targets(self, unit: Unit) -> dict[str, nn.Linear]:
        """Plain linears of `unit` whose input norms the method needs (`needs.linear_inputs`)."""
        return {}

    def summarize(self, unit: Unit, observation: Observation | None) -> Any:
        """What the global decision keeps of one unit (override to keep less than the observation)."""
        return observation

    def decide(self, summaries: dict[str, Any] | None, layers: list[MoELayer]) -> Any:
        """The decision shared by all units (e.g. per-layer counts); `summaries` only for global methods."""
        return None

    def reduce(self, unit: Unit, observation: Observation | None, decision: Any) -> UnitResult:
        """Plans (and weight changes) for one unit. `observation` is this pass's (or, for global methods that
        need no second look, the first pass's summary)."""
        raise NotImplementedError

    def second_phase(self) -> Any:
        """A method to run on the reduced model as part of the same step (STUN's Wanda/OWL phase)."""
        return None
