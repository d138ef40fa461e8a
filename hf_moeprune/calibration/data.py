"""Turn what the user passes as `calibration=` into packed token batches.

Files, folders and Hub datasets are read with `datasets` (see `sources.py`); chat rows are rendered with the
tokenizer's chat template. Texts are tokenised, joined with the EOS token and cut into blocks of `seq_len` tokens, so no batch carries
padding and every token counts in the statistics (the packing Wanda and SparseGPT use).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sources import dataset_rows, default_column, read_calibration_source


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

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (the longest, for a user's ragged token tensors)."""
        return max(int(b.shape[-1]) for b in self.batches)

    def sha256(self) -> str:
        """Digest of the token ids in order: equal digests mean the model saw exactly the same calibration data."""
        digest = hashlib.sha256()
        for batch in self.batches:
            digest.update(batch.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def record(self) -> dict[str, Any]:
        return {
            "description": self.description, "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "seq_len": self.seq_len, "token_sha256": self.sha256(),
        }


def prepare_calibration(
    calibration: Any,
    tokenizer: Any = None,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_sequences: int | None = 128,
    text_column: str | None = None,
    split: str | None = None,
    num_samples: int | None = None,
    chat_template: bool = False,
    description: str | None = None,
    vocab_size: int | None = None,
) -> CalibrationData:
    """Accept texts (with `tokenizer`), chat message lists (with `chat_template=True`), a `datasets.Dataset`, the
    name of a data file, folder, saved dataset or Hub dataset (see `read_calibration_source`), a 2-D tensor of
    token ids or a list of 1-D/2-D token tensors; return packed batches.

    Args:
        text_column: the dataset column to read (default `text`, or `messages` with `chat_template`).
        split: the split of a folder, saved dataset or Hub dataset (default `train`).
        num_samples: use only the first N rows, texts or token tensors (rows of a 2-D tensor), before packing.
        chat_template: render each row's messages with the tokenizer's chat template (instruct models).

    Token ids must be integers in `[0, vocab_size)` when `vocab_size` is given.

    Raises:
        ValueError: the set is empty, has no usable tokens, has bad token ids, or strings come without a tokenizer.
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if calibration is None:
        raise ValueError("This method needs calibration data: pass calibration=list of texts, a Dataset or token ids.")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_sequences", max_sequences),
                        ("num_samples", num_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    column = text_column or default_column(chat_template)
    if isinstance(calibration, (str, Path)):
        calibration, read = read_calibration_source(
            calibration, split=split, text_column=text_column, num_samples=num_samples, chat_template=chat_template
        )
        description = description or read
    elif _is_dataset(calibration):
        description = description or _describe(calibration)
        calibration = dataset_rows(calibration, column, num_samples=num_samples, chat_template=chat_template,
                                   where=description)
    elif num_samples is not None and (isinstance(calibration, (list, tuple)) or _is_token_matrix(calibration)):
        calibration = calibration[:num_samples]
    if chat_template:
        calibration = apply_chat_template(calibration, tokenizer)
    _check_token_ids(calibration, vocab_size)
    rows = _token_rows(calibration, tokenizer)
    what = description or _describe(calibration)
    if _is_token_matrix(calibration):
        sequences = calibration.long()
    else:
        stream = torch.cat(rows)  # `_token_rows` refuses an empty set
        if 0 < stream.numel() < seq_len:  # fewer tokens than one block: one short sequence
            sequences = stream.view(1, -1)
        else:
            sequences = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if max_sequences is not None:
        sequences = sequences[:max_sequences]
    if sequences.numel() == 0:
        raise ValueError("The calibration set is empty: it holds no tokens.")
    batches = [sequences[i : i + batch_size] for i in range(0, sequences.shape[0], batch_size)]
    return CalibrationData(batches=batches, description=what)


def apply_chat_template(conversations: Any, tokenizer: Any) -> list[str]:
    """Each conversation (a list of `{"role", "content"}` messages) rendered as text by the tokenizer's template.

    Raises:
        ValueError: no tokenizer, a tokenizer without a chat template, or rows that are not message lists.
    """
    if tokenizer is None:
        raise ValueError("chat_template=True needs a tokenizer: pass tokenizer=... (or load the model with one).")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template, so chat_template=True cannot apply; "
                         "drop it or use an instruct model's tokenizer.")
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("The calibration set is empty.")
    for number, conversation in enumerate(conversations, start=1):
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError(f"Calibration row {number}: chat_template=True needs a list of "
                             "{'role', 'content'} messages per row.")
    return [tokenizer.apply_chat_template(conversation, tokenize=False) for conversation in conversations]


def text_file_lines(file: Path) -> list[str]:
    """The lines of a (possibly gzipped) UTF-8 file.

    Raises:
        ValueError: naming the file, line and byte that is not UTF-8.
    """
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as handle:
        raw = handle.read()
    text_lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text_lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{file}, line {number}: not UTF-8 text (byte {line[error.start]:#04x} at column {error.start + 1}); "
                "calibration text files must be UTF-8."
            ) from None
    return text_lines


def json_lines(file: Path, text_lines: list[str]) -> list[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSON-lines file.

    Raises:
        ValueError: naming the file and line of malformed JSON.
    """
    records = []
    for number, line in enumerate(text_lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}, line {number}: malformed JSON ({error.msg}, column {error.colno}).") from None
    return records


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


def _token_rows(calibration: Any, tokenizer: Any) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        return [calibration.reshape(-1).long()]
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise ValueError("The calibration set is empty.")
    if all(isinstance(item, torch.Tensor) for item in calibration):
        return [item.reshape(-1).long() for item in calibration]
    if not all(isinstance(item, str) for item in calibration):
        hint = " (chat messages need chat_template=True)" if isinstance(calibration[0], list) else ""
        raise ValueError(f"Calibration items must be all strings or all token tensors{hint}.")
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


def _is_token_matrix(obj: Any) -> bool:
    """A 2-D tensor of token ids: its rows are the sequences, used as they are."""
    return isinstance(obj, torch.Tensor) and obj.dim() == 2


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__getitem__") and not isinstance(obj, (list, tuple))


def _describe(calibration: Any) -> str:
    if isinstance(calibration, torch.Tensor):
        return f"token tensor of shape {tuple(calibration.shape)}"
    if _is_dataset(calibration):
        name = getattr(getattr(calibration, "info", None), "dataset_name", None) or "datasets.Dataset"
        return f"{name} ({len(calibration)} rows)"
    if isinstance(calibration, (list, tuple)):
        tensors = calibration and all(isinstance(item, torch.Tensor) for item in calibration)
        return f"{len(calibration)} {'token tensors' if tensors else 'user-supplied texts'}"
    return type(calibration).__name__
