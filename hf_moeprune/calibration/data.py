"""Turn what the user passes as `calibration=` into packed token batches.

Texts are tokenised, joined with the EOS token and cut into blocks of `seq_len` tokens, so no batch carries
padding and every token counts in the statistics (the packing Wanda and SparseGPT use).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CalibrationData:
    """Packed `input_ids` batches plus a description recorded in the checkpoint."""

    batches: list[torch.Tensor]
    description: str

    @property
    def num_sequences(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)

    def record(self) -> dict[str, Any]:
        return {"description": self.description, "num_sequences": self.num_sequences, "num_tokens": self.num_tokens}


def prepare_calibration(
    calibration: Any,
    tokenizer: Any = None,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_sequences: int | None = 128,
    text_column: str = "text",
    description: str | None = None,
) -> CalibrationData:
    """Accept a list of strings (with `tokenizer`), a `datasets.Dataset` with a text column, a 2-D tensor of
    token ids or a list of 1-D/2-D token tensors; return packed batches.

    Raises:
        ValueError: the set is empty, has no usable tokens, or strings come without a tokenizer.
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if calibration is None:
        raise ValueError("This method needs calibration data: pass calibration=list of texts, a Dataset or token ids.")
    rows = _token_rows(calibration, tokenizer, text_column)
    what = description or _describe(calibration)
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        sequences = calibration.long()
    else:
        stream = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
        usable = (stream.numel() // seq_len) * seq_len
        if usable == 0 and stream.numel() > 0:
            sequences = stream.view(1, -1)
        else:
            sequences = stream[:usable].view(-1, seq_len)
    if max_sequences is not None:
        sequences = sequences[:max_sequences]
    if sequences.numel() == 0:
        raise ValueError("The calibration set is empty: it holds no tokens.")
    batches = [sequences[i : i + batch_size] for i in range(0, sequences.shape[0], batch_size)]
    return CalibrationData(batches=batches, description=what)


def read_text_file(path: str | Path) -> list[str]:
    """Documents of a text file: `.txt` separated by blank lines, or `.jsonl` / `.jsonl.gz` with a `text` field."""
    file = Path(path)
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle if line.strip()]
    return [block.strip() for block in file.read_text(encoding="utf-8").split("\n\n") if block.strip()]


def _token_rows(calibration: Any, tokenizer: Any, text_column: str) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        return [calibration.reshape(-1).long()]
    if _is_dataset(calibration):
        if text_column not in calibration.column_names:
            raise ValueError(f"The calibration dataset has no {text_column!r} column (columns: {calibration.column_names}).")
        calibration = list(calibration[text_column])
    if isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise ValueError("The calibration set is empty.")
    if all(isinstance(item, torch.Tensor) for item in calibration):
        return [item.reshape(-1).long() for item in calibration]
    if not all(isinstance(item, str) for item in calibration):
        raise ValueError("Calibration items must be all strings or all token tensors.")
    if tokenizer is None:
        raise ValueError("Calibration texts need a tokenizer: pass tokenizer=... (or load the model from a folder with one).")
    texts = [t for t in calibration if t.strip()]
    if not texts:
        raise ValueError("The calibration set is empty: every text is blank.")
    eos = tokenizer.eos_token_id
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        rows.append(torch.tensor(list(ids) + ([eos] if eos is not None else []), dtype=torch.long))
    return rows


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__getitem__") and not isinstance(obj, (list, tuple))


def _describe(calibration: Any) -> str:
    if isinstance(calibration, torch.Tensor):
        return f"token tensor of shape {tuple(calibration.shape)}"
    if _is_dataset(calibration):
        name = getattr(getattr(calibration, "info", None), "dataset_name", None) or "datasets.Dataset"
        return f"{name} ({len(calibration)} rows)"
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} user-supplied texts"
    return type(calibration).__name__
