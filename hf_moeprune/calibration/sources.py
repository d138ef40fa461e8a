"""Read a calibration source with `datasets`: a local data file, a folder, a `save_to_disk` dataset or a Hub id.

`datasets` does the reading (the same loaders as `load_dataset("json", data_files=...)`); this module picks the
loader, the split and the column, and turns the failures users meet (no such file, an empty set, a missing column,
a bad line) into one-line `ValueError`s that name the source and what to do.

Example:
    >>> rows, description = read_calibration_source("data/calib.jsonl", text_column="text", num_samples=256)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# File suffix -> `datasets` packaged loader. `.txt` documents are separated by blank lines (sample_by="paragraph").
DATA_FILE_LOADERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".arrow": "arrow",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# Formats whose failures are explained line by line (bad UTF-8, malformed JSON).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".txt.gz", ".jsonl.gz")
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz")
DEFAULT_SPLIT = "train"
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_CHAT_COLUMN = "messages"


def default_column(chat_template: bool) -> str:
    """`messages` for chat-formatted data, `text` otherwise."""
    return DEFAULT_CHAT_COLUMN if chat_template else DEFAULT_TEXT_COLUMN


def read_calibration_source(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    text_column: str | None = None,
    num_samples: int | None = None,
    chat_template: bool = False,
) -> tuple[list[Any], str]:
    """The rows of `text_column` in a calibration source, and a one-line description of what was read.

    Args:
        source: a data file (.txt, .json, .jsonl, .csv, .tsv, .parquet, .arrow, optionally compressed), a folder of
            such files, a folder written by `Dataset.save_to_disk`, or a Hub dataset id (`owner/name`).
        split: the split to read (default `train`; a single-split saved dataset needs none).
        text_column: the column to read (default `text`, or `messages` with `chat_template`).
        num_samples: read only the first N rows.
        chat_template: rows are chat messages (lists of `{"role", "content"}`), rendered later by the tokenizer.

    Raises:
        ValueError: the source does not exist or cannot be read, the split or column is missing, or no row is usable.
    """
    dataset, where = load_calibration_dataset(source, split=split)
    column = text_column or default_column(chat_template)
    rows = dataset_rows(dataset, column, num_samples=num_samples, chat_template=chat_template, where=where)
    parts = [where]
    if split:
        parts.append(f"split {split}")
    parts.append(f"column {column!r}")
    parts.append(f"{len(rows)} rows")
    if chat_template:
        parts.append("chat template applied")
    return rows, ", ".join(parts)


def load_calibration_dataset(source: str | os.PathLike, *, split: str | None = None) -> tuple[Any, str]:
    """A `datasets.Dataset` for `source` (see `read_calibration_source`) and the name to use in messages."""
    import datasets

    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        return load_data_file(path, split), name
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _pick_split(_load(name, lambda: datasets.load_from_disk(str(path))), split, name), name
        return _load(name, lambda: datasets.load_dataset(str(path), split=split or DEFAULT_SPLIT)), name
    if not _could_be_hub_id(name):
        raise ValueError(
            f"calibration={name!r} names no file or folder; pass an existing data file "
            f"({', '.join(sorted(DATA_FILE_LOADERS))}), a folder, a saved dataset or a Hub dataset id."
        )
    return _load(name, lambda: datasets.load_dataset(name, split=split or DEFAULT_SPLIT)), f"Hub dataset {name}"


def dataset_rows(
    dataset: Any, column: str, *, num_samples: int | None, chat_template: bool, where: str
) -> list[Any]:
    """The first `num_samples` values of `column`: strings, or message lists with `chat_template`; `where` names
    the dataset in errors.

    Raises:
        ValueError: the column is missing, the set is empty, or a row holds no usable value (named by its row).
    """
    if column not in dataset.column_names:
        chat = "messages" in dataset.column_names and not chat_template
        hint = "chat data: pass chat_template=True, or choose a column" if chat else "choose one"
        columns = dataset.column_names
        raise ValueError(f"{where}: no {column!r} column (columns: {columns}); {hint} with text_column=NAME.")
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    try:
        rows = list(dataset[column])
    except UnicodeDecodeError as error:  # pyarrow's JSON reader keeps bad bytes until a row is read
        _explain_bad_bytes(where)
        raise ValueError(f"{where}: the {column!r} column is not UTF-8 text ({error.reason}); "
                         "calibration text must be UTF-8.") from None
    if not rows:
        raise ValueError(f"{where}: the calibration set is empty (no rows).")
    for number, value in enumerate(rows, start=1):
        problem = _chat_problem(value) if chat_template else _text_problem(value)
        if value is None:
            found = sorted(key for key, item in dataset[number - 1].items() if item is not None)
            problem = f"no {column!r} value (found: {found})"
        if problem:
            raise ValueError(f"{where}, {_locate(where, number)}: {problem}.")
    if not chat_template and not any(value.strip() for value in rows):
        raise ValueError(f"{where}: the calibration set is empty: every {column!r} value is blank.")
    return rows


def _text_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        return "holds a list, not text (chat messages? pass chat_template=True)"
    return f"holds {type(value).__name__}, not text"


def _chat_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "chat_template=True needs a non-empty list of {'role', 'content'} messages per row"
    for message in value:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            return "chat_template=True needs every message to be a {'role', 'content'} mapping"
    return None


def _locate(where: str, number: int) -> str:
    """`line N` for a JSON-lines file (its line numbers, counting blank lines), `row N` otherwise."""
    from .data import json_lines, text_file_lines

    path = Path(where).expanduser()
    if path.is_file() and path.name.endswith(JSON_LINES_SUFFIXES):
        records = json_lines(path, text_file_lines(path))
        if number <= len(records):
            return f"line {records[number - 1][0]}"
    return f"row {number}"


def _explain_bad_bytes(name: str) -> None:
    """Raise the line-numbered explanation of undecodable bytes or malformed JSON in a text file (or in the text
    files of a folder), if there is any."""
    from .data import json_lines, text_file_lines

    path = Path(name).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.is_file() and file.name.endswith(TEXT_SUFFIXES):
            lines = text_file_lines(file)
            if file.name.endswith(JSON_LINES_SUFFIXES):
                json_lines(file, lines)


def data_file_loader(path: str | os.PathLike) -> str | None:
    """The `datasets` loader for a data file, judged by its suffix looking through compression; None if unknown."""
    return DATA_FILE_LOADERS.get(_format_suffix(path))


def _format_suffix(path: str | os.PathLike) -> str:
    """`.jsonl` for `docs.jsonl.gz`: the suffix that names the format, lower-cased, behind any compression suffix."""
    name = Path(path).name.lower()
    stem = name[: -len(Path(name).suffix)] if name.endswith(COMPRESSION_SUFFIXES) else name
    return Path(stem).suffix


def load_data_file(path: Path, split: str | None = None) -> Any:
    """A local data file as a `datasets.Dataset`, one row per line or record (per paragraph, stripped, for text).

    Raises:
        ValueError: an unknown file type, an empty file, a split other than `train`, or a file `datasets` cannot read.
    """
    import datasets

    loader = data_file_loader(path)
    if loader is None:
        raise ValueError(
            f"{path}: not a data file type datasets can read; use one of {', '.join(sorted(DATA_FILE_LOADERS))}."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (it has no bytes).")
    if split not in (None, DEFAULT_SPLIT):
        raise ValueError(f"{path}: a single file has only the {DEFAULT_SPLIT!r} split, not {split!r}; drop split=.")
    options: dict[str, Any] = {"sample_by": "paragraph"} if loader == "text" else {}
    if _format_suffix(path) == ".tsv":
        options["delimiter"] = "\t"
    files = str(path)
    table = _load(files, lambda: datasets.load_dataset(loader, data_files=files, split=DEFAULT_SPLIT, **options))
    if loader == "text":  # datasets splits on "\n\n": an odd run of newlines or the file's last one stays
        table = table.map(lambda row: {DEFAULT_TEXT_COLUMN: row[DEFAULT_TEXT_COLUMN].strip()})
    return table


def _load(name: str, load: Any) -> Any:
    """Run a `datasets` loader; its failure becomes one line naming `name` (and the bad line of a text file)."""
    import datasets

    logger = datasets.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(datasets.logging.CRITICAL)  # its own error log would repeat the one-line error raised below
    try:
        return load()
    except Exception as error:
        _explain_bad_bytes(name)
        cause = error.__cause__ or error
        message = " ".join(str(cause).split()) or type(cause).__name__
        raise ValueError(f"{name}: datasets could not read it ({type(cause).__name__}: {message}).") from error
    finally:
        logger.setLevel(level)


def _pick_split(loaded: Any, split: str | None, name: str) -> Any:
    if not hasattr(loaded, "keys"):  # a saved Dataset is one split already
        return loaded
    splits = sorted(loaded.keys())
    if split is None:
        split = DEFAULT_SPLIT if DEFAULT_SPLIT in loaded or len(splits) != 1 else splits[0]
    if split not in loaded:
        raise ValueError(f"{name}: no split {split!r} (splits: {splits}); choose one with split=.")
    return loaded[split]


def _could_be_hub_id(name: str) -> bool:
    """A Hub id is `name` or `owner/name` without a data-file suffix; anything else can only be a local path."""
    from ..records import looks_like_hub_repo_id

    return data_file_loader(name) is None and looks_like_hub_repo_id(name)
