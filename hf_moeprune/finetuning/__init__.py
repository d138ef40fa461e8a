"""Recovery fine-tuning of reduced models: `finetune(model_or_path, texts, output, FinetuneArgs(...))`.

Named `finetuning` rather than `finetune` so that the public function `hf_moeprune.finetune` is never shadowed
by this subpackage (importing a submodule sets the parent package's attribute of the same name). `finetune` loads
lazily, so `hf-moeprune finetune --help` reads `FinetuneArgs` without importing torch.
"""

from __future__ import annotations

from typing import Any

from .args import FinetuneArgs

__all__ = ["FinetuneArgs", "finetune"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from .run import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
