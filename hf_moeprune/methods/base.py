"""The contract every expert method follows, and the context it runs in.

A method turns calibration statistics (or none, for data-free methods) into a `ReductionPlan`; the wrapper
applies the plan with the shared surgery code. Methods that also change weights inside experts (Wanda, OWL,
STUN's second phase) do so in `run` and report the achieved sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from ..calibration import CalibrationData, LayerStatistics, collect_statistics
from ..config import MoEPruneConfig
from ..families import FamilySpec
from ..moe_layers import MoELayer
from ..surgery import ReductionPlan
from .options import NoOptions, normalised, parse_options


@dataclass
class MethodContext:
    """What a method may read: the model, its MoE layers, the recipe and the calibration batches."""

    model: nn.Module
    layers: list[MoELayer]
    spec: FamilySpec
    config: MoEPruneConfig
    calibration: CalibrationData | None = None
    progress: bool = True
    forward_passes: int = 0
    _statistics: dict[str, LayerStatistics] | None = field(default=None, repr=False)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def statistics(self) -> dict[str, LayerStatistics]:
        """Per-layer routing statistics, collected on first use with one pass over the calibration batches."""
        if self._statistics is None:
            if self.calibration is None:
                raise ValueError(f"Method {self.config.method!r} needs calibration data.")
            self._statistics = collect_statistics(
                self.model, self.layers, self.calibration.batches,
                is_encoder_decoder=self.is_encoder_decoder, progress=self.progress,
            )
            self.forward_passes += len(self.calibration.batches)
        return self._statistics


@dataclass
class MethodResult:
    """A method's outcome: the expert plan (None when experts are untouched) and what else it recorded."""

    plan: ReductionPlan | None = None
    weight_sparsity: dict[str, float] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class ExpertMethod:
    """Base class of registered methods. Subclasses set the class attributes and implement `run`.

    Attributes:
        name: Registry key used in `MoEPruneConfig(method=...)`.
        pretty_name: Name shown in model cards.
        paper: Link to the method's paper (None for plain baselines).
        kind: `"prune"` (removes experts), `"merge"` (merges experts) or `"unstructured"` (zeros weights).
        needs_calibration: False for data-free methods, which then run without any forward pass. A method
            whose need depends on its config (STUN's router-weight variant) overrides it per instance; the
            wrapper reads it from the instance.
        unstructured_phase: True for expert methods that also zero weights (STUN); the others refuse
            `weight_sparsity` / `unstructured` / `nm_pattern` instead of silently dropping them.
        Options: dataclass of the method's `method_options`; parsed into `self.opts` when the method is built,
            so unknown keys and wrong types fail before any weights are read.
    """

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    paper: ClassVar[str | None] = None
    kind: ClassVar[Literal["prune", "merge", "unstructured"]] = "prune"
    needs_calibration: ClassVar[bool] = True
    unstructured_phase: ClassVar[bool] = False
    Options: ClassVar[type | None] = NoOptions

    def __init__(self, config: MoEPruneConfig) -> None:
        self.config = config
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

    def validate(self, layers: list[MoELayer]) -> None:
        """Raise a ValueError before any calibration when the request cannot work on these layers."""
        if self.kind != "unstructured" and not self.config.has_expert_target:
            raise ValueError(
                f"Method {self.name!r} needs an expert target: experts_per_layer, expert_sparsity or num_experts_total."
            )

    def run(self, context: MethodContext) -> MethodResult:
        raise NotImplementedError

    def after_surgery(self, context: MethodContext) -> dict[str, float] | None:
        """Called by the wrapper after `run`'s plan is applied; override to change the reduced model further.

        Two-phase methods (STUN: experts first, then weights inside the survivors) do their second phase
        here, on the model as the plan left it. Returns achieved weight sparsity per module path, or None.
        """
        return None
