"""The user's own text for perplexity (`hf-moeprune eval --data FILE`), read by `datasets` from local files.

Files are read exactly as calibration files are (`calibration.sources.load_data_file`), so a file that calibrates
a model also evaluates it.
"""

from __future__ import annotations

from pathlib import Path

from ..calibration.sources import DATA_FILE_LOADERS, data_file_loader, load_data_file
from ..calibration.sources import DEFAULT_TEXT_COLUMN as TEXT_COLUMN


def check_text_source(data: str | Path) -> Path:
    """The path of `data`, or a one-line error naming what is wrong, before any model is loaded."""
    path = Path(data)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise ValueError(f"--data {path}: a folder must be a dataset saved with `save_to_disk`.")
        return path
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file.")
    if data_file_loader(path) is None:
        formats = ", ".join(sorted(DATA_FILE_LOADERS))
        raise ValueError(f"--data {path}: unknown format; give one of {formats} (optionally compressed) or a "
                         "save_to_disk folder.")
    return path


def load_text(data: str | Path):
    """The documents of `data` as a `datasets.Dataset` with a "text" column (and any others it has).

    A `.txt` or `.md` file gives one document per paragraph (blank-line separated, stripped); the other formats of
    `load_data_file` need a "text" column (a "domain" or "topic" column splits the perplexity by its values); a
    folder is a dataset written by `save_to_disk` (of a `DatasetDict`, its first split).
    """
    import datasets

    path = check_text_source(data)
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            table = table[next(iter(table))]
    else:
        table = load_data_file(path)
    if TEXT_COLUMN not in table.column_names:
        raise ValueError(f"--data {path}: no {TEXT_COLUMN!r} column (columns: {', '.join(table.column_names)}).")
    table = table.filter(lambda row: bool(row[TEXT_COLUMN] and row[TEXT_COLUMN].strip()))
    if len(table) == 0:
        raise ValueError(f"--data {path}: no non-empty text.")
    return table
