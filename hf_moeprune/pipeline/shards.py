"""Reading a checkpoint's tensors a few at a time, and writing a reduced one shard by shard.

Keys are mapped to the model's parameters by transformers' own conversion rules (the ones
`from_pretrained` applies), so the Hub's per-expert layout (`block_sparse_moe.experts.3.w1.weight`) and
transformers 5's fused tensors both load, and writing reverts them to the checkpoint layout that
`save_pretrained` writes. Each shard file is opened only while its tensors are read, so the mapped pages
are released with it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(folder: Path) -> dict[str, str]:
    """Key -> shard file name, from the index or the single weights file; a ValueError when there is neither."""
    index = folder / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)
    raise ValueError(
        f"{folder} has no {INDEX_FILE} or {SINGLE_FILE}; streaming reads safetensors checkpoints only."
    )


def checkpoint_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in set(checkpoint_files(folder).values()))


class CheckpointReader:
    """The tensors of a safetensors checkpoint, read by key into a model built on the meta device."""

    def __init__(self, folder: Path, model: nn.Module, dtype: torch.dtype | None) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.folder, self.dtype = folder, dtype
        self.files = checkpoint_files(folder)
        self.mapping = get_model_conversion_mapping(model)
        renamings = [t for t in self.mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self.mapping if isinstance(t, WeightConverter)]
        meta_keys = dict.fromkeys(model.state_dict())
        prefix = getattr(model, "base_model_prefix", None)
        self.targets = {
            key: rename_source_key(key, renamings, converters, prefix, meta_keys)[0] for key in self.files
        }

    def target_of(self, key: str) -> str:
        return self.targets[key]

    def keys_by_unit(self, unit_paths: Sequence[str]) -> dict[str | None, list[str]]:
        """Checkpoint keys per unit path (by the model name they load into); None: keys outside every unit."""
        groups: dict[str | None, list[str]] = defaultdict(list)
        ordered = sorted(unit_paths, key=len, reverse=True)
        for key, target in self.targets.items():
            owner = next((path for path in ordered if target.startswith(path + ".")), None)
            groups[owner].append(key)
        return {path: groups.get(path, []) for path in [*unit_paths, None]}

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        tensors = {}
        for name, file_keys in by_file.items():
            with safe_open(self.folder / name, framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in file_keys})
        return tensors

    def load_into(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Convert `tensors` to the model's layout and put them in place of its meta parameters."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(
            pretrained_model_name_or_path=str(self.folder), dtype=self.dtype, weight_mapping=self.mapping
        )
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            convert_and_load_state_dict_in_model(model, tensors, config)
        finally:
            if bars:
                hf_logging.enable_progress_bar()


class ShardWriter:
    """Writes one shard per decoder layer plus one for everything else, then the index."""

    def __init__(self, folder: Path, num_units: int) -> None:
        self.folder = folder
        self.total = num_units + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard_name(self, position: int) -> str:
        return f"model-{position + 1:05d}-of-{self.total:05d}.safetensors"

    def write_module(self, model: nn.Module, path: str, module: nn.Module, position: int) -> None:
        self._write({f"{path}.{key}": value for key, value in module.state_dict().items()}, model, position)

    def write_outside(self, model: nn.Module, unit_paths: Sequence[str]) -> None:
        """The tensors outside every unit (embedding, final norm, LM head; tied ones once), then the index."""
        inside = tuple(path + "." for path in unit_paths)
        seen: set[int] = set()
        outside = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if key.startswith(inside) or id(value) in seen:
                continue
            seen.add(id(value))
            outside[key] = value.detach()
        self._write(outside, model, self.total - 1)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write(self, state: dict[str, torch.Tensor], model: nn.Module, position: int) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)  # views into the layer's tensors, no copies
        name = self.shard_name(position)
        write_safetensors(self.folder / name, state, metadata={"format": "pt"})
        for key, value in state.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time from the tensors' own memory.

    `safetensors.torch.save_file` first copies every tensor into a bytes object, which doubles a layer's
    memory at the moment it is written; here only one tensor at a time is made contiguous on the CPU.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for key in sorted(tensors):
            data = tensors[key].detach().to("cpu").contiguous()
            if data.numel():
                file.write(data.reshape(-1).view(torch.uint8).numpy().data)
