"""Reducing a checkpoint bigger than memory: the model stays on the meta device, decoder layers stream
from its safetensors shards through the same pipeline the in-memory path uses.

Peak memory is one decoder layer (two while the next is prefetched) plus the calibration activations,
whatever the depth. Each phase (STUN's expert and weight phases are two) reads the previous phase's
shards and writes new ones into a folder beside the output; the finished checkpoint is swapped into place
atomically, as `save_pretrained` does, and the input is only ever read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_output_dir, save_checkpoint
from ..config import MoEPruneConfig
from ..methods import get_method
from .shards import CheckpointReader, ShardWriter, checkpoint_bytes
from .sources import StreamingSource

PARTIAL_TAG = "moeprune-partial"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (the first GPU when there is one)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, config: Any) -> torch.dtype | None:
    """The dtype asked for, else the checkpoint's own (from its config); None keeps each tensor's."""
    chosen = dtype if dtype not in (None, "auto") else getattr(config, "dtype", None)
    if chosen is None or isinstance(chosen, torch.dtype):
        return chosen
    value = getattr(torch, str(chosen).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"Unknown dtype {chosen!r}; use bfloat16, float16 or float32.")
    return value


def local_checkpoint(model: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; a Hub id downloaded (config, tokenizer and safetensors shards only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"]
    return Path(snapshot_download(str(model), allow_patterns=patterns, **hub_kwargs))


def check_free_disk(source: Path, output: Path, phases: int) -> None:
    """Refuse up front when the output folder's disk cannot hold the phases' shards (at most two at once)."""
    needed = checkpoint_bytes(source) * min(phases, 2)
    free = shutil.disk_usage(output.parent if output.parent.exists() else Path.cwd()).free
    if free < needed:
        raise OSError(
            f"Not enough free disk beside {output}: the reduced shards need up to {needed / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free; free some space or choose another output folder."
        )


def build_meta_model(config: Any, dtype: torch.dtype | None, task: str, trust_remote_code: bool) -> torch.nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights

    from ..modeling import model_class_for_config

    model_class = model_class_for_config(config, task)
    with init_empty_weights():
        model = model_class._from_config(config, dtype=dtype) if dtype else model_class._from_config(config)
    return model.eval()


def reduce_checkpoint(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: MoEPruneConfig,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    hub_kwargs: dict[str, Any] | None = None,
    **calibration_options: Any,
) -> Path:
    """Reduce the checkpoint at `model` (folder or Hub id) with one recipe, streaming one layer at a time.

    The result equals `AutoMoEPruneModelForCausalLM.from_pretrained(model)` + `prune_experts` /
    `merge_experts` + `save_pretrained`, tensor for tensor. Returns the output folder.

    Args:
        config: The recipe (any registered method).
        calibration: As for `prune_experts`; data-free methods ignore it.
        device: Where each layer runs: `cpu`, `cuda`, `cuda:N` or `auto`.
        dtype: Compute and output dtype; default the checkpoint's.
        **calibration_options: `seq_len`, `batch_size`, `max_sequences`, `description`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..calibration import prepare_calibration
    from ..families import family_for_model_type
    from ..modeling import MoEPruneModel, _write_card

    method = get_method(config.method)(config)  # option errors first
    folder = local_checkpoint(model, **(hub_kwargs or {}))
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    family = family_for_model_type(hf_config.model_type)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, hf_config)
    output = check_output_dir(output_dir, overwrite=overwrite, source=folder)
    phases = 2 if method.second_phase() is not None else 1
    check_free_disk(folder, output, phases)
    meta = build_meta_model(hf_config, torch_dtype, family.task, trust_remote_code)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    wrapper = MoEPruneModel(meta, tokenizer)
    layers = wrapper.moe_layers()
    method.validate(layers)
    data = None
    if method.needs_calibration:
        options = {"vocab_size": getattr(hf_config, "vocab_size", None), **calibration_options}
        data = prepare_calibration(calibration, tokenizer, **options)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.{PARTIAL_TAG}-{os.getpid()}"
    written: list[Path] = []

    def next_source() -> StreamingSource:
        previous = written[-1] if written else folder
        target = partial / f"phase-{len(written)}"
        target.mkdir(parents=True)
        if len(written) >= 2:
            shutil.rmtree(written[-2])  # two phases back: no longer read by anyone
        reader = CheckpointReader(previous, meta, torch_dtype)
        source = StreamingSource(meta, layers, reader, None, target_device)
        source.writer = ShardWriter(target, len(source.units))
        written.append(target)
        return source

    def move_shards(staging: Path) -> None:
        for item in written[-1].iterdir():
            os.replace(item, staging / item.name)

    from .runner import run_step

    try:
        report = run_step(next_source, method, data.batches if data is not None else None, progress=progress)
        wrapper.record_step(config, report, data.record() if data is not None else None)
        return save_checkpoint(
            meta, layers, wrapper.record, output, tokenizer=tokenizer, task=family.task,
            extra_files=lambda staging: _write_card(staging, output.name), overwrite=overwrite, source=folder,
            write_weights=move_shards,
        )
    finally:
        shutil.rmtree(partial, ignore_errors=True)
