"""Recovery fine-tuning of reduced models: `finetune(model_or_path, texts, output, FinetuneArgs(...))`.

Named `finetuning` rather than `finetune` so that the public function `hf_moeprune.finetune` is never shadowed
by this subpackage (importing a submodule sets the parent package's attribute of the same name).
"""

from .args import FinetuneArgs
from .run import finetune

__all__ = ["FinetuneArgs", "finetune"]
