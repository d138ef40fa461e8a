"""Testbed MoE models trained from scratch on real English text of seven domains, and their data."""

from __future__ import annotations

from pathlib import Path

from .data import (
    BBC_TOPICS,
    DOMAINS,
    TOKENIZER_DIR,
    Document,
    calibration_documents,
    heldout_documents,
    load_bbc,
    load_shakespeare,
    read_documents,
    split_documents,
    split_of,
)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
TESTBEDS = ("mixtral-8e", "mixtral-32e")
DEFAULT_TESTBED = "mixtral-8e"


def testbed_path(name: str = DEFAULT_TESTBED) -> Path:
    """Folder of a shipped testbed checkpoint ("mixtral-8e" or "mixtral-32e"), loadable with
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`."""
    if name not in TESTBEDS:
        raise ValueError(f"Unknown testbed {name!r}; known: {', '.join(TESTBEDS)}.")
    return CHECKPOINT_DIR / name


def default_model_path() -> Path:
    """The project's embedded default model: the 8-expert testbed."""
    return testbed_path(DEFAULT_TESTBED)


__all__ = [
    "BBC_TOPICS",
    "DEFAULT_TESTBED",
    "DOMAINS",
    "Document",
    "TESTBEDS",
    "TOKENIZER_DIR",
    "calibration_documents",
    "default_model_path",
    "heldout_documents",
    "load_bbc",
    "load_shakespeare",
    "read_documents",
    "split_documents",
    "split_of",
    "testbed_path",
]
