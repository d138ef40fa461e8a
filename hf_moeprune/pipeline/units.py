"""The units a pipeline walks through: decoder layers, with the MoE layers inside each.

Decoder-only models are walked layer by layer (which is what lets a checkpoint stream from disk). An
encoder-decoder model (Switch) has two stacks that feed each other through cross-attention, so it is
observed in one pass of the whole model and its units are the blocks that hold MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..calibration.sequential import find_decoder_layers
from ..moe_layers import MoELayer


@dataclass
class Unit:
    """One decoder layer (or encoder/decoder block) and the MoE layers inside it, by full module path."""

    index: int
    path: str
    module: nn.Module
    moe_layers: list[MoELayer]


def is_layerwise(model: nn.Module) -> bool:
    """True when the model is one stack of decoder layers fed by the embedding (decoder-only)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        find_decoder_layers(model)
    except ValueError:
        return False
    return True


def decoder_units(model: nn.Module, moe_layers: Sequence[MoELayer]) -> list[Unit]:
    """Every decoder layer of a decoder-only model, in order, dense ones included."""
    prefix, layers = find_decoder_layers(model)
    units = []
    for index, module in enumerate(layers):
        path = f"{prefix}.{index}" if prefix else str(index)
        inside = [layer for layer in moe_layers if layer.path.startswith(path + ".")]
        units.append(Unit(index=index, path=path, module=module, moe_layers=inside))
    return units


def block_units(model: nn.Module, moe_layers: Sequence[MoELayer]) -> list[Unit]:
    """Units of an encoder-decoder model: the items of every outermost stack of same-class blocks
    (`encoder.block.3`, `decoder.block.0`)."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or isinstance(module[0], nn.Linear):
            continue
        if len({type(item) for item in module}) == 1 and not any(name.startswith(s + ".") for s in stacks):
            stacks.append(name)
    units = []
    for stack in stacks:
        for position, module in enumerate(model.get_submodule(stack)):
            path = f"{stack}.{position}"
            inside = [layer for layer in moe_layers if layer.path.startswith(path + ".")]
            units.append(Unit(index=len(units), path=path, module=module, moe_layers=inside))
    return units
