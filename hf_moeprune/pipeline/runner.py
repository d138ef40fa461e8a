"""The one place calibration passes run: a method's step over a source's units.

A step is one or two sweeps over the units. A global decision (STUN's threshold, adaptive budgets, OWL's
layer sparsities, REAP's super experts) first sweeps the original model collecting summaries; then the
reducing sweep calls `reduce` per unit, applies the plans with the shared surgery and, for sequential
methods, re-runs the reduced layer so the next one sees its outputs. Forward passes are counted here and
nowhere else: a sweep with calibration is one pass per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibration.sequential import run_layer
from ..calibration.statistics import run_calibration
from ..methods.base import ExpertMethod, Needs
from ..surgery import ReductionPlan, apply_plan
from .observe import Observation, observe
from .sources import InMemorySource
from .units import Unit


@dataclass
class StepReport:
    """What a step did: the plans applied, weight sparsity reached, the method's details, passes run."""

    plan: ReductionPlan
    weight_sparsity: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    forward_passes: int = 0


@torch.no_grad()
def run_method(
    source: InMemorySource,
    method: ExpertMethod,
    batches: Sequence[torch.Tensor] | None,
    *,
    write: bool = False,
    progress: bool = True,
) -> StepReport:
    """Run `method` over `source` (changing its units in place) and return the report.

    Args:
        source: Where the units come from (`InMemorySource` or `StreamingSource`).
        method: A built method (options parsed, `validate` already called).
        batches: Calibration `input_ids` batches; ignored by data-free methods.
        write: Let the source write each reduced unit (streaming output).
        progress: Show a progress bar per sweep (one tick per layer).
    """
    needs = method.needs
    if needs.calibration and not batches:
        raise ValueError(f"Method {method.name!r} needs calibration data.")
    top_k = method.config.top_k if method.config is not None else None
    report = StepReport(plan=ReductionPlan(top_k=top_k))
    was_training = source.model.training
    source.model.eval()
    try:
        summaries = None
        if needs.global_decision:
            summaries = {}
            first = _sweep(source, method, needs, batches if needs.calibration else None, "original",
                           needs.summary_weights, False, report, f"{method.name}: statistics", progress)
            for unit, observation in first:
                summaries[unit.path] = method.summarize(unit, observation)
        decision = method.decide(summaries, source.moe_layers)
        fresh = needs.calibration and (needs.sequential or not needs.global_decision)
        second = _sweep(source, method, needs, batches if fresh else None,
                        "reduced" if needs.sequential else "original", "all", write, report, method.name, progress)
        for unit, observation in second:
            seen = observation if fresh else (summaries or {}).get(unit.path)
            result = method.reduce(unit, seen, decision)
            if result.plans:
                apply_plan(unit.moe_layers, ReductionPlan(layers=result.plans, top_k=top_k))
                report.plan.layers.update(result.plans)
            report.weight_sparsity.update(result.weight_sparsity)
    finally:
        source.model.train(was_training)
    report.details = method.details
    return report


def _sweep(
    source: InMemorySource,
    method: ExpertMethod,
    needs: Needs,
    batches: Sequence[torch.Tensor] | None,
    propagate: str,
    weights: str,
    write: bool,
    report: StepReport,
    description: str,
    progress: bool,
) -> Iterator[tuple[Unit, Observation | None]]:
    """Yield each unit (loaded) with what this sweep observed of it; after the caller is done with a unit,
    its outputs (original or reduced, per `propagate`) become the next unit's inputs."""
    units = tqdm(source.walk(weights, write), total=len(source.units), desc=description, unit="layer",
                 disable=not progress)
    if batches is None:
        for unit in units:
            yield unit, None
        return
    report.forward_passes += len(batches)
    if not source.layerwise:  # encoder-decoder: one pass of the whole model observes every unit
        encoder_decoder = bool(getattr(source.model.config, "is_encoder_decoder", False))
        observations, _ = observe(
            source.units, method, needs,
            lambda: run_calibration(source.model, batches, is_encoder_decoder=encoder_decoder, progress=False),
        )
        for unit in units:
            yield unit, observations[unit.path]
        return
    inputs = source.capture(batches)
    for unit in units:
        observations, outputs = observe([unit], method, needs, lambda unit=unit: run_layer(unit.module, inputs))
        yield unit, observations[unit.path]
        inputs.hidden = run_layer(unit.module, inputs) if propagate == "reduced" else outputs


def run_step(
    sources: Callable[[], InMemorySource],
    method: ExpertMethod,
    batches: Sequence[torch.Tensor] | None,
    *,
    progress: bool = True,
) -> StepReport:
    """`run_method`, then the method's second phase (STUN's Wanda/OWL) on the reduced model: one step.

    `sources()` gives the source of each phase in turn (the same model in memory; streaming, a reader of
    the previous phase's shards and a writer of this phase's).
    """
    phase = method.second_phase()
    report = run_method(sources(), method, batches, write=True, progress=progress)
    if phase is not None:
        second = run_method(sources(), phase, batches, write=True, progress=progress)
        report.weight_sparsity.update(second.weight_sparsity)
        report.details = {**report.details, "unstructured": {"algorithm": phase.options.algorithm, **second.details}}
        report.forward_passes += second.forward_passes
    return report
