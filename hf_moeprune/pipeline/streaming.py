"""Reducing a checkpoint bigger than memory: the model stays on the meta device, decoder layers stream
from its safetensors shards through the same pipeline the in-memory path uses.

Peak memory is one decoder layer (the next one is warmed in the page cache, not read into the process)
plus the calibration activations, whatever the depth. Each phase (STUN's expert and weight phases are two) reads the previous phase's
shards and writes new ones into a folder beside the output; the finished checkpoint is swapped into place
atomically, as `save_pretrained` does, and the input is only ever read.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import _process_alive, check_output_dir, save_checkpoint
from ..config import MoEPruneConfig
from ..memory import available_memory, return_freed_tensors_to_the_system
from ..methods import get_method
from .shards import CheckpointReader, ShardWriter, checkpoint_bytes
from .sources import StreamingSource

PARTIAL_TAG = "moeprune-partial"
STATE_FILE = "resume.pt"
logger = logging.getLogger(__name__)


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


def check_free_disk(source: Path, output: Path, growth: float) -> None:
    """Refuse up front when the output folder's disk cannot hold the result. Reductions never grow a
    checkpoint beyond `growth` times the input (the dtype ratio), and a later phase deletes each shard of
    the previous one as soon as its layer is written, so about one output's worth is on disk at a time."""
    needed = int(checkpoint_bytes(source) * growth)
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
    resume: bool = False,
    activations: str = "auto",
    progress: bool = True,
    recipe: dict[str, Any] | None = None,
    base_model: str | None = None,
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
        resume: Continue an interrupted run of the same recipe after its last finished layer.
        activations: Where calibration hidden states wait between layers: `memory`, `disk` (files in the
            run's folder beside the output, one batch in memory at a time) or `auto` (disk when one copy
            would take over a quarter of the available memory).
        recipe: The recipe file content of the whole run (CLI), kept in the record for the card.
        base_model: The Hub id the input came from, for the card (default: `model` when it is a Hub id).
        **calibration_options: `seq_len`, `batch_size`, `max_sequences`, `description`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..calibration import prepare_calibration
    from ..families import family_for_model_type
    from ..modeling import MoEPruneModel, _write_card

    method = get_method(config.method)(config)  # option errors first
    if activations not in ("auto", "memory", "disk"):
        raise ValueError(f"activations={activations!r} is not one of auto, memory, disk.")
    folder = local_checkpoint(model, **(hub_kwargs or {}))
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    family = family_for_model_type(hf_config.model_type)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, hf_config)
    output = check_output_dir(output_dir, overwrite=overwrite, source=folder)
    stored = resolve_dtype(None, hf_config)
    growth = torch_dtype.itemsize / stored.itemsize if torch_dtype is not None and stored is not None else 1.0
    check_free_disk(folder, output, max(growth, 1.0))
    return_freed_tensors_to_the_system()  # else freed layers stay in a fragmented heap
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
    partial = output.parent / f".{output.name}.{PARTIAL_TAG}"
    fingerprint = {
        "input": str(folder), "input_bytes": checkpoint_bytes(folder), "recipe": config.to_dict(),
        "dtype": str(torch_dtype), "calibration": data.record() if data is not None else None,
    }
    state = _previous_run(partial, fingerprint, resume=resume, overwrite=overwrite)
    spill = None
    if data is not None and (activations == "disk" or (
            activations == "auto" and 4 * activation_bytes(data, hf_config, torch_dtype) > available_memory())):
        spill = partial / "activations"
        logger.info("Calibration activations wait between layers in files under %s.", spill)

    def phase_source(phase: int) -> StreamingSource:
        target = partial / f"phase-{phase}"
        target.mkdir(parents=True, exist_ok=True)
        previous = partial / f"phase-{phase - 1}" if phase else folder
        source = StreamingSource(meta, layers, CheckpointReader(previous, meta, torch_dtype), None, target_device)
        source.spill = spill
        source.writer = ShardWriter(target, len(source.units))
        source.consume_input = phase > 0  # never the user's input
        return source

    def save_state(progress_state: dict[str, Any]) -> None:
        _write_state(partial, {"fingerprint": fingerprint, "pid": os.getpid(), **progress_state})

    def link_shards(staging: Path) -> None:
        # hard links, not moves: if the save fails after this, the finished shards are still there to resume
        last = max(partial.glob("phase-*"), key=lambda path: int(path.name.split("-")[1]))
        for item in last.iterdir():
            os.link(item, staging / item.name)

    from .runner import run_step

    try:
        report = run_step(
            phase_source, method, data.batches if data is not None else None, progress=progress,
            moe_layers=layers, resume=state, save_state=save_state,
        )
        wrapper.record_step(config, report, data.record() if data is not None else None)
        if recipe is not None:
            wrapper.record["recipe"] = recipe
        if base_model is not None:
            wrapper.record["base_model"] = base_model
        elif not Path(model).expanduser().exists():
            wrapper.record["base_model"] = wrapper.record["base_model"] or str(model)  # a Hub id, downloaded
        saved = save_checkpoint(
            meta, layers, wrapper.record, output, tokenizer=tokenizer, task=family.task,
            extra_files=lambda staging: _write_card(staging, output.name), overwrite=overwrite, source=folder,
            write_weights=link_shards,
        )
    except BaseException as error:
        # a refusal of the input (ValueError: a broken weight, a bad plan) would fail the same way on resume
        if (partial / STATE_FILE).is_file() and not isinstance(error, ValueError):
            logger.warning("Interrupted: the finished layers are kept in %s; run the same command with --resume "
                           "to continue from there.", partial)
        else:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)
    return saved


def activation_bytes(data: Any, config: Any, dtype: torch.dtype | None) -> int:
    """Bytes of one copy of the calibration hidden states entering a decoder layer."""
    hidden = getattr(config, "hidden_size", None) or getattr(config.get_text_config(), "hidden_size", 0)
    itemsize = (dtype or torch.float32).itemsize
    return sum(batch.numel() for batch in data.batches) * hidden * itemsize


def _write_state(partial: Path, state: dict[str, Any]) -> None:
    """Atomically replace the resume state (a crash leaves the previous layer's state, never half a file)."""
    temporary = partial / (STATE_FILE + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, partial / STATE_FILE)


def _previous_run(partial: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> dict | None:
    """The state to resume from, or None to start afresh; refuses to discard or mix up an interrupted run."""
    state_file = partial / STATE_FILE
    if not partial.exists():
        if resume:
            logger.warning("Nothing to resume beside the output (no %s); starting from the first layer.", partial)
        return None
    state = torch.load(state_file, weights_only=False) if state_file.is_file() else None
    if state is not None and state["pid"] != os.getpid() and _process_alive(state["pid"]):
        raise RuntimeError(f"Another run (process {state['pid']}) is writing {partial}; wait for it to finish.")
    if state is None or (overwrite and not resume):
        shutil.rmtree(partial)  # nothing finished yet, or the user asked to start over
        return None
    where = f"phase {len(state['phases']) + 1}, {state['current']['done'] + 1} layer(s) finished"
    if not resume:
        raise FileExistsError(
            f"{partial} holds an interrupted run of this output ({where}); pass --resume / resume=True to "
            "continue it, or --overwrite / overwrite=True to start over."
        )
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{partial} holds an interrupted run of a different recipe, input or calibration set; rerun that "
            "exact command with --resume, or pass --overwrite without --resume to start over."
        )
    phase = len(state["phases"])
    missing = [
        position for position in range(state["current"]["done"] + 1)
        if not list((partial / f"phase-{phase}").glob(f"model-{position + 1:05d}-of-*.safetensors"))
    ]
    if missing:
        raise ValueError(
            f"{partial} is incomplete: the shards of finished layers {missing} are gone, so it cannot be resumed; "
            "pass --overwrite / overwrite=True without --resume to start over."
        )
    logger.warning("Resuming from %s: %s.", partial, where)
    return {"phases": state["phases"], "current": state["current"]}
