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
    vocab_size: int | None = None,
) -> CalibrationData:
    """Accept a list of strings (with `tokenizer`), a `datasets.Dataset` with a text column, a 2-D tensor of
    token ids or a list of 1-D/2-D token tensors; return packed batches.

    A single string must name a calibration file (read with `read_text_file`); token ids must be integers in
    `[0, vocab_size)` when `vocab_size` is given.

    Raises:
        ValueError: the set is empty, has no usable tokens, has bad token ids, or strings come without a tokenizer.
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if calibration is None:
        raise ValueError("This method needs calibration data: pass calibration=list of texts, a Dataset or token ids.")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_sequences", max_sequences)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    if isinstance(calibration, (str, Path)):
        if not Path(calibration).is_file():
            raise ValueError(
                f"calibration={str(calibration)!r} is a string that names no file; pass a list of texts "
                "(calibration=[text, ...]) or the path of an existing .txt / .jsonl file."
            )
        description = description or str(calibration)
        calibration = read_text_file(calibration)
    _check_token_ids(calibration, vocab_size)
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


def read_text_file(path: str | Path, field: str = "text") -> list[str]:
    """Documents of a text file: `.txt` separated by blank lines, or `.jsonl` / `.jsonl.gz` with a `text` field.

    Raises:
        ValueError: naming the file and line of undecodable bytes, malformed JSON or a record without `field`.
    """
    file = Path(path)
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    text_lines = []
    for number, line in enumerate(lines, start=1):
        try:
            text_lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{file}, line {number}: not UTF-8 text (byte {line[error.start]:#04x} at column {error.start + 1}); "
                "calibration files must be UTF-8 .txt or .jsonl."
            ) from None
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        documents = []
        for number, line in enumerate(text_lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}, line {number}: malformed JSON ({error.msg}, column {error.colno}).") from None
            if not isinstance(record, dict) or field not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{file}, line {number}: no {field!r} field (found: {found}).")
            if not isinstance(record[field], str):
                raise ValueError(f"{file}, line {number}: the {field!r} field is not a string.")
            documents.append(record[field])
        return documents
    text = "\n".join(text_lines)
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _check_token_ids(calibration: Any, vocab_size: int | None) -> None:
    """Token tensors must hold integer ids inside the vocabulary; floats are refused, not cast."""
    if isinstance(calibration, torch.Tensor):
        tensors = [calibration]
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, torch.Tensor) for t in calibration):
        tensors = list(calibration)
    else:
        return
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"Calibration token ids must be an integer tensor, got dtype {tensor.dtype}.")
        if tensor.numel() == 0:
            continue
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0:
            raise ValueError(f"Calibration token ids must be >= 0, found {low}.")
        if vocab_size is not None and high >= vocab_size:
            raise ValueError(f"Calibration token id {high} is outside the model's vocabulary of {vocab_size} tokens.")


def _token_rows(calibration: Any, tokenizer: Any, text_column: str) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        return [calibration.reshape(-1).long()]
    if _is_dataset(calibration):
        if text_column not in calibration.column_names:
            raise ValueError(f"The calibration dataset has no {text_column!r} column (columns: {calibration.column_names}).")
        calibration = list(calibration[text_column])
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
