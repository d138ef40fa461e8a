"""Layer-by-layer (sequential) calibration: each decoder layer sees the outputs of the already-processed ones.

The pipeline Wanda, SparseGPT and llm-compressor use. The inputs of the first decoder layer are captured once
over the calibration batches (the embedding and anything before it run once); then each decoder layer is run
on the cached inputs and its outputs become the next layer's inputs. Only one layer's activations are held at
a time, and no decoder layer needs to be in memory before its turn, so the same loop serves checkpoints
larger than memory (`hf_moeprune.pipeline` brings each layer in from disk).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder layers: the longest ModuleList whose items are all the same class.

    Raises:
        ValueError: the model has no such list (encoder-decoder models are handled one-shot instead).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) != 1 or isinstance(module[0], nn.Linear):
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of decoder layers; sequential calibration needs one."
        )
    return best


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor in transformers 5, a tuple in older layers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class DiskBatches(Sequence[torch.Tensor]):
    """Hidden states kept in files, one per calibration batch, in a folder of their own: only the batch being
    computed is in memory, so a calibration set larger than memory can still pass through a streamed model.
    Pickles as its file paths (a resume state refers to them)."""

    def __init__(self, parent: Path) -> None:
        self.folder = Path(parent) / uuid.uuid4().hex
        self.folder.mkdir(parents=True)
        self.paths: list[Path] = []

    def append(self, tensor: torch.Tensor) -> None:
        path = self.folder / f"{len(self.paths):06d}.pt"
        torch.save(tensor.contiguous(), path)
        self.paths.append(path)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return torch.load(self.paths[index], weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[index] for index in range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def release(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


Batches = list[torch.Tensor] | DiskBatches


def release(batches: Batches) -> None:
    """Delete the files of spilled batches (in-memory ones are freed by the garbage collector)."""
    if isinstance(batches, DiskBatches):
        batches.release()


@dataclass
class LayerInputs:
    """The hidden states entering the current decoder layer, one tensor per calibration batch, and the
    keyword arguments (masks, position embeddings) every layer of that batch receives. With `spill`, the
    hidden states live in files under that folder instead of in memory."""

    hidden: Batches
    kwargs: list[dict[str, Any]]
    spill: Path | None = None

    def new_batches(self) -> Batches:
        return DiskBatches(self.spill) if self.spill is not None else []


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], spill: Path | None = None
) -> LayerInputs:
    """Run the model up to its first decoder layer for every batch (no decoder layer runs, so they may still
    be on the meta device) and keep what that layer receives (in files under `spill` when given)."""
    _, layers = find_decoder_layers(model)
    inputs = LayerInputs(hidden=[], kwargs=[], spill=spill)
    inputs.hidden = inputs.new_batches()

    def capture(module: nn.Module, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        state = args[0] if args else kw.pop("hidden_states")
        inputs.hidden.append(state.detach().cpu())
        kept = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
        inputs.kwargs.append(to_device(kept, "cpu"))
        raise _StopForward

    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> Batches:
    """The layer's outputs on every cached batch, on CPU (hooks installed by the caller observe the run).

    Activations stay in host memory (or in files, as the inputs do) between layers; each batch visits the
    layer's device for its run.
    """
    device = next((p.device for p in layer.parameters()), torch.device("cpu"))
    outputs = inputs.new_batches()
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        outputs.append(layer_output(layer(hidden.to(device), **to_device(kwargs, device))).cpu())
    return outputs


def to_device(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor inside (dicts, tuples, lists) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


class InputNormCollector:
    """Sum of squared inputs per input feature of modules applying a `[out, in]` weight to their first input
    (`nn.Linear`, and MoE routers, which are not `nn.Linear` in transformers 5): Wanda's ||X_j||_2^2.

    Args:
        modules: `{path: module}` to observe.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sq: dict[str, torch.Tensor] = {
            p: torch.zeros(m.weight.shape[-1], dtype=torch.float64) for p, m in modules.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputNormCollector:
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(path)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sq[path] += x.pow(2).sum(0).double().cpu()

        return hook
