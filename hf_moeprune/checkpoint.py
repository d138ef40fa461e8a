"""Writing reduced checkpoints: atomically, with the record in `config.json`, loadable by transformers.

A uniform result is saved as the family's own architecture. A non-uniform one additionally gets a per-layer
`layout` in its record, the loader code beside the weights (`modeling_moeprune.py`) and an `auto_map`
entry, so `trust_remote_code=True` loads it where hf_moeprune is not installed.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import nonuniform
from .moe_layers import MoELayer
from .records import RECORD_KEY, is_uniform

REMOTE_CODE_FILE = "modeling_moeprune.py"
AUTO_CLASS_BY_TASK = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM"}


def layer_layout(layer: MoELayer) -> dict[str, Any]:
    """Everything `nonuniform.resize_moe_layers` needs to rebuild this layer at its current size."""
    spec = layer.spec
    expert_tensors = [f"{spec.router}.{name}" for name in layer.router_tensors()]
    if spec.expert_layout == "fused":
        expert_tensors += [f"{spec.experts}.{t.name}" for t in layer.expert_tensor_specs()]
    return {
        "num_experts": layer.num_experts,
        "top_k": layer.top_k,
        "router": spec.router,
        "expert_tensors": expert_tensors,
        "expert_modules": spec.experts if spec.expert_layout == "modules" else None,
        "expert_module_name": spec.expert_module_name,
        "count_attributes": [list(pair) for pair in layer.count_attribute_paths()],
        "top_k_attributes": [list(pair) for pair in layer.top_k_attribute_paths()],
    }


def remote_code_source(base_class: type, task: str) -> tuple[str, str]:
    """`nonuniform.py` plus the class that `auto_map` points at, bound to the family's base class."""
    wrapper_name = "MoEPrunedForCausalLM" if task == "causal-lm" else "MoEPrunedForSeq2SeqLM"
    return (
        inspect.getsource(nonuniform)
        + f"\n\nfrom transformers import {base_class.__name__} as _BaseModel  # noqa: E402\n\n"
        + f"{wrapper_name} = with_per_layer_experts(_BaseModel)\n"
        + f'{wrapper_name}.__name__ = {wrapper_name}.__qualname__ = "{wrapper_name}"\n'
    ), wrapper_name


def atomic_directory(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh sibling folder, then rename it into place.

    An exception (or interrupt) while writing removes the temporary folder and leaves `output_dir` as it
    was: there is never a half-written checkpoint at the destination.
    """
    output = Path(output_dir).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write(tmp)
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, backup / output.name)
            os.replace(tmp, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def save_checkpoint(
    model: nn.Module,
    layers: Sequence[MoELayer],
    record: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    task: str = "causal-lm",
    extra_files: Callable[[Path], None] | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save `model` with its record; non-uniform results get the per-layer loader. Returns the folder."""
    config = model.config
    record = dict(record)
    record["uniform"] = is_uniform(record)
    previous_auto_map = getattr(config, "auto_map", None)
    if record["uniform"]:
        record.pop("layout", None)
    else:
        record["layout"] = {layer.path: layer_layout(layer) for layer in layers}
    base_class = _transformers_base(type(model))
    # Remote code can only rebuild classes that transformers itself ships; others (our native Arctic) load
    # through hf_moeprune, which registers them with the Auto classes.
    portable = base_class is not None
    if portable:
        source, wrapper_name = remote_code_source(base_class, task)

    def write(folder: Path) -> None:
        setattr(config, RECORD_KEY, record)
        if not record["uniform"] and portable:
            config.auto_map = {AUTO_CLASS_BY_TASK[task]: f"{REMOTE_CODE_FILE[:-3]}.{wrapper_name}"}
        try:
            model.save_pretrained(folder, **save_kwargs)
        finally:
            if previous_auto_map is None and hasattr(config, "auto_map"):
                del config.auto_map
            elif previous_auto_map is not None:
                config.auto_map = previous_auto_map
        if not record["uniform"] and portable:
            (folder / REMOTE_CODE_FILE).write_text(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if extra_files is not None:
            extra_files(folder)

    return atomic_directory(output_dir, write)


def _transformers_base(model_class: type) -> type | None:
    """The first class in the MRO that transformers exports as a model with a head, else None."""
    import transformers

    for cls in model_class.__mro__:
        exported = getattr(transformers, cls.__name__, None) is cls
        if exported and issubclass(cls, transformers.PreTrainedModel) and cls is not transformers.PreTrainedModel:
            return cls
    return None
