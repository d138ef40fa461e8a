"""Observing units during a calibration pass: the hooks a method's `Needs` ask for, installed and removed
in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibration.sequential import InputNormCollector
from ..calibration.statistics import LayerStatistics, StatisticsCollector, _register_recording_implementation
from .units import Unit

if TYPE_CHECKING:
    from ..methods.base import ExpertMethod, Needs


@dataclass
class Observation:
    """What one pass saw of one unit.

    Attributes:
        statistics: `LayerStatistics` per MoE layer path.
        block_inputs: Hidden states entering each MoE block, `[T, H]` float32 on CPU, per MoE layer path.
        linear_sq: Sum of squared inputs per input feature of each observed linear or router (Wanda's
            ||X_j||^2; a router sees every token of its layer, as the reference's `gate` nn.Linear does).
        linears: The observed linears and routers by path (what `linear_sq` is about).
    """

    statistics: dict[str, LayerStatistics] = field(default_factory=dict)
    block_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    linear_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, nn.Module] = field(default_factory=dict)


def observe(
    units: Sequence[Unit], method: ExpertMethod, needs: Needs, run: Callable[[], Any]
) -> tuple[dict[str, Observation], Any]:
    """Run `run()` with the hooks `needs` asks for on `units`; returns an observation per unit path and
    whatever `run` returned (the units' outputs)."""
    moe_layers = [layer for unit in units for layer in unit.moe_layers]
    linears = {path: module for unit in units for path, module in method.linear_targets(unit).items()}
    collector = StatisticsCollector(moe_layers) if needs.statistics and moe_layers else None
    norms = InputNormCollector(linears) if needs.linear_inputs else None
    captured: dict[str, list[torch.Tensor]] = {layer.path: [] for layer in moe_layers} if needs.block_inputs else {}
    with ExitStack() as stack:
        if collector is not None:
            _register_recording_implementation()
            stack.enter_context(collector.recording())
        if norms is not None:
            stack.enter_context(norms)
        for layer in moe_layers if needs.block_inputs else []:
            handle = layer.block.register_forward_pre_hook(
                lambda module, args, path=layer.path: captured[path].append(
                    args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
                )
            )
            stack.callback(handle.remove)
        result = run()
    observations = {}
    for unit in units:
        paths = [layer.path for layer in unit.moe_layers]
        observations[unit.path] = Observation(
            statistics={p: collector.statistics[p] for p in paths} if collector is not None else {},
            block_inputs={p: torch.cat(captured[p]) for p in paths if captured.get(p)},
            linear_sq={p: norms.sq[p] for p in method.linear_targets(unit)} if norms is not None else {},
            linears=method.linear_targets(unit) if norms is not None else {},
        )
    return observations, result
