"""Reading a checkpoint's tensors a few at a time, and writing a reduced one shard by shard.

Keys are mapped to the model's parameters by transformers' own conversion rules (the ones
`from_pretrained` applies), so the Hub's per-expert layout (`block_sparse_moe.experts.3.w1.weight`) and
transformers 5's fused tensors both load, and writing reverts them to the checkpoint layout that
`save_pretrained` writes. Tensors are read with plain positioned reads into freshly allocated memory, not
through a memory map: no mapped pages count against the process, and one system call per tensor replaces a
page fault per 4 KiB. A layer is read and converted one target parameter at a time, so its raw tensors
and their converted copies never coexist whole; the next layer is brought into the page cache (not into
the process) while the current one is computed.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
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
        self._headers: dict[str, SafetensorsHeader] = {}
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
        tensors = {}
        for name, file_keys in self._by_file(keys).items():
            tensors.update(read_safetensors(self.folder / name, file_keys, self._header(name)))
        return tensors

    def load(self, model: nn.Module, keys: Sequence[str]) -> None:
        """Read `keys` and load them into `model`, one target parameter at a time, largest first: the peak is
        the loaded part plus one parameter's raw tensors and conversion copies, not twice the layer."""
        groups: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            groups[self.targets[key]].append(key)
        size = {target: sum(self._header(self.files[k]).tensors[k].nbytes for k in group)
                for target, group in groups.items()}
        for target in sorted(groups, key=lambda t: (-size[t], t)):
            self.load_into(model, self.read(groups[target]))

    def prefetch(self, keys: Sequence[str]) -> None:
        """Bring the bytes of `keys` into the page cache (not into this process), so that reading them next
        does not wait for the disk; meant for a background thread while the current layer is computed."""
        for name, file_keys in self._by_file(keys).items():
            header = self._header(name)
            spans = sorted(header.tensors[key].span(header.data_start) for key in file_keys)
            with open(self.folder / name, "rb", buffering=0) as file:
                for start, end in _merged(spans):
                    _read_through(file, start, end)

    def _by_file(self, keys: Sequence[str]) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        return by_file

    def _header(self, name: str) -> SafetensorsHeader:
        if name not in self._headers:
            self._headers[name] = read_header(self.folder / name)
        return self._headers[name]

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
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
READ_CHUNK = 16 << 20  # bytes per system call (and of the one buffer) when warming the page cache


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def span(self, data_start: int) -> tuple[int, int]:
        return data_start + self.begin, data_start + self.end


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int
    tensors: dict[str, TensorEntry]


def read_header(path: Path) -> SafetensorsHeader:
    """The JSON header of a safetensors file: each tensor's dtype, shape and byte range."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    entries = {key: TensorEntry(v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for key, v in header.items()}
    return SafetensorsHeader(8 + length, entries)


def read_safetensors(path: Path, keys: Sequence[str], header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """The tensors `keys` of one file, each read with one positioned read into its own new memory."""
    tensors = {}
    with open(path, "rb", buffering=0) as file:
        for key in keys:
            entry = header.tensors[key]
            if entry.dtype not in TORCH_DTYPES:  # a dtype this reader does not know: let safetensors decode it
                with safe_open(path, framework="pt") as handle:
                    tensors[key] = handle.get_tensor(key)
                continue
            tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
            buffer = tensor.reshape(-1).view(torch.uint8).numpy() if entry.nbytes else None
            done = 0
            while done < entry.nbytes:  # a read may return less than asked for
                got = os.preadv(file.fileno(), [buffer[done:]], header.data_start + entry.begin + done)
                if got <= 0:
                    raise OSError(f"{path} ends inside tensor {key!r}; the checkpoint file is truncated.")
                done += got
            tensors[key] = tensor
    return tensors


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _read_through(file, start: int, end: int) -> None:
    """Read [start, end) into one small reused buffer: the pages land in the page cache, not in this process."""
    buffer = bytearray(min(READ_CHUNK, end - start))
    view = memoryview(buffer)
    while start < end:
        got = os.preadv(file.fileno(), [view[: min(len(buffer), end - start)]], start)
        if got <= 0:
            return
        start += got


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
