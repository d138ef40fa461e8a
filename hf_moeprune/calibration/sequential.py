"""Layer-by-layer (sequential) calibration: each decoder layer sees the outputs of the already-processed ones.

The pipeline Wanda, SparseGPT and llm-compressor use. The inputs of the first decoder layer are captured once
over the calibration batches (the embedding and anything before it run once); then for every decoder layer
the caller observes it on the cached inputs, changes it (pruning), and the layer is re-run to produce the
inputs of the next one. Only one layer's activations are held at a time, so the same loop serves checkpoints
larger than memory: how a layer gets into memory (`load_layer`) and leaves it (`release_layer`) is the
caller's business, the loop only calls them.

Example:
    >>> pipeline = SequentialPipeline.from_model(model, batches)
    >>> for step in pipeline:
    ...     step.run()            # observe: hooks installed by the caller see this layer's real inputs
    ...     prune(step.layer)     # change it
    ...     step.advance()        # re-run the changed layer: the next layer's inputs
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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


@dataclass
class LayerStep:
    """One decoder layer of the sweep, with its cached inputs (one entry per calibration batch)."""

    index: int
    path: str
    layer: nn.Module
    pipeline: SequentialPipeline

    def run(self) -> list[torch.Tensor]:
        """Run the layer on every cached batch (hooks installed by the caller observe it); returns outputs."""
        outputs = []
        with torch.no_grad():
            for hidden, kwargs in zip(self.pipeline.hidden, self.pipeline.kwargs, strict=True):
                outputs.append(layer_output(self.layer(hidden, **kwargs)))
        self.pipeline.layer_runs += 1
        return outputs

    def advance(self, outputs: list[torch.Tensor] | None = None) -> None:
        """Make this layer's outputs the next layer's inputs (re-running it unless `outputs` are given)."""
        self.pipeline.hidden = outputs if outputs is not None else self.run()


@dataclass
class SequentialPipeline:
    """Cached first-layer inputs plus the decoder layers to walk through.

    Args:
        layers: The decoder layers, in order.
        paths: Their module paths.
        hidden: Hidden states entering the current layer, one tensor per calibration batch.
        kwargs: The keyword arguments each batch's layers receive (masks, position embeddings); reused as is.
        load_layer / release_layer: Called around each step, e.g. to bring a layer from disk and drop it.
    """

    layers: Sequence[nn.Module]
    paths: Sequence[str]
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    load_layer: Callable[[int], nn.Module] | None = None
    release_layer: Callable[[int, nn.Module], None] | None = None
    layer_runs: int = 0
    capture_passes: int = 0
    _released: set[int] = field(default_factory=set, repr=False)

    @classmethod
    @torch.no_grad()
    def from_model(
        cls, model: nn.Module, batches: Iterable[torch.Tensor], **hooks: Any
    ) -> SequentialPipeline:
        """Capture the inputs of the first decoder layer for every batch (the rest of the model is not run)."""
        prefix, layers = find_decoder_layers(model)
        hidden: list[torch.Tensor] = []
        kwargs: list[dict[str, Any]] = []

        def capture(module: nn.Module, args: tuple, kw: dict) -> None:
            kw = dict(kw)
            state = args[0] if args else kw.pop("hidden_states")
            hidden.append(state.detach())
            kwargs.append(
                {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
            )
            raise _StopForward

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        passes = 0
        try:
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                passes += 1
        finally:
            handle.remove()
            model.train(was_training)
        paths = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(layers))]
        return cls(
            layers=list(layers), paths=paths, hidden=hidden, kwargs=kwargs, capture_passes=passes, **hooks
        )

    def __iter__(self) -> Iterator[LayerStep]:
        for index in range(len(self.layers)):
            layer = self.load_layer(index) if self.load_layer is not None else self.layers[index]
            yield LayerStep(index=index, path=self.paths[index], layer=layer, pipeline=self)
            if self.release_layer is not None:
                self.release_layer(index, layer)

    def clone_inputs(self) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The current inputs, to start a second sweep from the same point (OWL's outlier pass)."""
        return [h.clone() for h in self.hidden], list(self.kwargs)


class InputNormCollector:
    """Sum of squared inputs per input feature of plain `nn.Linear` modules (Wanda's ||X_j||_2^2).

    Args:
        modules: `{path: linear}` to observe.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self.sq: dict[str, torch.Tensor] = {
            p: torch.zeros(m.in_features, dtype=torch.float64) for p, m in modules.items()
        }
        self.tokens: dict[str, int] = dict.fromkeys(modules, 0)
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
            self.tokens[path] += x.shape[0]

        return hook
