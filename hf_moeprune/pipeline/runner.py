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

from ..calibration.sequential import LayerInputs, release, run_layer
from ..calibration.statistics import run_calibration
from ..methods.base import ExpertMethod, Needs
from ..methods.targets import warn_routers_without_choice
from ..moe_layers import MoELayer
from ..progress import progress_bars_disabled
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
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> StepReport:
    """Run `method` over `source` (changing its units in place) and return the report.

    Args:
        source: Where the units come from (`InMemorySource` or `StreamingSource`).
        method: A built method (options parsed, `validate` already called).
        batches: Calibration `input_ids` batches; ignored by data-free methods.
        write: Let the source write each reduced unit (streaming output).
        progress: Show a progress bar per sweep (one tick per layer).
        resume: A state `save_state` received: the reducing sweep continues after its last finished unit.
        save_state: Called after every finished unit of the reducing sweep with everything needed to resume.
    """
    needs = method.needs
    if needs.calibration and not batches:
        raise ValueError(f"Method {method.name!r} needs calibration data.")
    top_k = method.config.top_k if method.config is not None else None
    was_training = source.model.training
    source.model.eval()
    try:
        if resume is not None:
            method = resume["method"]  # with its details so far (and any state its hooks keep)
            report, summaries, decision = resume["report"], resume["summaries"], resume["decision"]
            for unit in source.units[: resume["done"] + 1]:
                reapply(unit.moe_layers, report.plan)
        else:
            report = StepReport(plan=ReductionPlan(top_k=top_k))
            summaries = None
            if needs.global_decision:
                summaries = {}
                first = _sweep(source, method, needs, batches if needs.calibration else None, "original",
                               needs.summary_weights, False, report, f"{method.name}: statistics", progress)
                for unit, observation in first:
                    summaries[unit.path] = method.summarize(unit, observation)
            decision = method.decide(summaries, source.moe_layers)
        fresh = needs.calibration and (needs.sequential or not needs.global_decision)
        kept = None if fresh else summaries  # what the reducing sweep reads instead of a fresh observation

        def finished(unit: Unit, inputs: Any) -> None:
            if save_state is not None:
                save_state({"method": method, "report": report, "summaries": kept, "decision": decision,
                            "done": unit.index, "inputs": inputs})

        second = _sweep(source, method, needs, batches if fresh else None,
                        "reduced" if needs.sequential else "original", "all", write, report, method.name, progress,
                        start=resume["done"] + 1 if resume else 0, inputs=resume["inputs"] if resume else None,
                        finished=finished)
        for unit, observation in second:
            seen = observation if fresh else (kept or {}).get(unit.path)
            result = method.reduce(unit, seen, decision)
            if result.plans:
                apply_plan(unit.moe_layers, ReductionPlan(layers=result.plans, top_k=top_k))
                report.plan.layers.update(result.plans)
            report.weight_sparsity.update(result.weight_sparsity)
        warn_routers_without_choice(source.moe_layers, report.plan.layers)
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
    *,
    start: int = 0,
    inputs: LayerInputs | None = None,
    finished: Callable[[Unit, LayerInputs | None], None] | None = None,
) -> Iterator[tuple[Unit, Observation | None]]:
    """Yield each unit (loaded) with what this sweep observed of it; after the caller is done with a unit,
    its outputs (original or reduced, per `propagate`) become the next unit's inputs, the source writes and
    frees it, and `finished` is told. `start` and `inputs` continue an interrupted sweep."""
    bar = tqdm(total=len(source.units), initial=start, desc=description, unit="layer",
               disable=not progress or progress_bars_disabled())
    observations: dict[str, Observation] = {}
    if batches is not None:
        if start == 0:
            report.forward_passes += len(batches)
        if not source.layerwise:  # encoder-decoder: one pass of the whole model observes every unit
            encoder_decoder = bool(getattr(source.model.config, "is_encoder_decoder", False))
            observations, _ = observe(
                source.units, method, needs,
                lambda: run_calibration(source.model, batches, is_encoder_decoder=encoder_decoder, progress=False),
            )
        elif inputs is None:
            inputs = source.capture(batches)
    try:
        for position in range(start, len(source.units)):
            unit = source.load(position, weights)
            if batches is None:
                yield unit, None
            elif not source.layerwise:
                yield unit, observations[unit.path]
            else:
                seen, outputs = observe([unit], method, needs, lambda unit=unit: run_layer(unit.module, inputs))
                yield unit, seen[unit.path]
                previous = inputs.hidden
                if propagate == "reduced":
                    release(outputs)
                    outputs = run_layer(unit.module, inputs)
                inputs.hidden = outputs
            source.finish(unit, write)
            if finished is not None and write:
                finished(unit, inputs)
            if batches is not None and source.layerwise:
                release(previous)  # only now: the resume state saved above no longer refers to it
            bar.update()
        if inputs is not None:
            release(inputs.hidden)  # the last layer's outputs: no layer follows
        source.close(write)
    finally:
        bar.close()


def reapply(layers: Sequence[MoELayer], plan: ReductionPlan) -> None:
    """Give finished layers of an interrupted run their new shapes again (on meta tensors: no weights)."""
    plans = {layer.path: plan.layers[layer.path] for layer in layers if layer.path in plan.layers}
    if plans:
        apply_plan([layer for layer in layers if layer.path in plans], ReductionPlan(layers=plans, top_k=plan.top_k))


def run_step(
    sources: Callable[[int], InMemorySource],
    method: ExpertMethod,
    batches: Sequence[torch.Tensor] | None,
    *,
    progress: bool = True,
    moe_layers: Sequence[MoELayer] = (),
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> StepReport:
    """`run_method`, then the method's second phase (STUN's Wanda/OWL) on the reduced model: one step.

    `sources(phase)` gives each phase's source (the same model in memory; streaming, a reader of the
    previous phase's shards and a writer of this phase's). `resume` / `save_state` as in `run_method`,
    wrapped with the reports of finished phases (whose plans are re-applied to `moe_layers`).
    """
    phases = [method] + [phase for phase in [method.second_phase()] if phase is not None]
    reports: list[StepReport] = list(resume["phases"]) if resume else []
    for report in reports:
        reapply(moe_layers, report.plan)
    for index in range(len(reports), len(phases)):
        current = resume["current"] if resume and index == len(resume["phases"]) else None
        save = None
        if save_state is not None:
            save = lambda state: save_state({"phases": reports, "current": state})  # noqa: E731
        reports.append(run_method(sources(index), phases[index], batches, write=True, progress=progress,
                                  resume=current, save_state=save))
    report = reports[0]
    for phase, second in zip(phases[1:], reports[1:], strict=True):
        report.weight_sparsity.update(second.weight_sparsity)
        report.details = {**report.details, "unstructured": {"algorithm": phase.options.algorithm, **second.details}}
        report.forward_passes += second.forward_passes
    return report
