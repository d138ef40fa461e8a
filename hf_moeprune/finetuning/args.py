"""What a recovery fine-tune does, as a dataclass light enough for `hf-moeprune finetune --help` (no torch).

Each field is one command-line option (`--max-steps` for `max_steps`) and is recorded, as `to_dict()`, in the
checkpoint's `moeprune` record. The optimiser defaults are those of transformers' `TrainingArguments`
(AdamW, learning rate 5e-5, linear decay). Distillation follows Hinton et al. (https://arxiv.org/abs/1503.02531):
the KL divergence between temperature-softened distributions, scaled by T^2 so its gradients keep their size as T
changes; T = 2 and an even mix with the LM loss are starting points, not tuned values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FinetuneArgs:
    """A short fine-tune of a reduced model, optionally distilled from the original model's logits."""

    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to run."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    batch_size: int = field(default=8, metadata={"help": "Packed sequences per step and device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches summed into one step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    max_sequences: int | None = field(
        default=None, metadata={"help": "Use at most this many packed sequences (default: all); the data repeats "
                                "until max-steps is reached."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear learning-rate warm-up."})
    lr_scheduler: str = field(default="linear", metadata={"help": f"Learning-rate schedule: {', '.join(SCHEDULERS)}."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient norm clipping."})
    alpha: float = field(
        default=0.5, metadata={"help": "Share of the distillation loss when there is a teacher: loss = (1 - alpha) "
                               "x LM loss + alpha x T^2 x KL(teacher || student); 0 trains on the LM loss alone "
                               "and loads no teacher."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the distillation loss."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order; the same seed gives the same model."})
    save_steps: int = field(
        default=50, metadata={"help": "Write a resumable training checkpoint (weights, optimizer, data position) "
                              "every N steps."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    dtype: str | None = field(
        default=None, metadata={"help": f"Dtype of the saved model: {', '.join(DTYPES)} (default: the input's own). "
                                "Training always keeps float32 weights."})
    bf16: bool = field(default=False, metadata={"help": "Compute in bfloat16 autocast (float32 weights)."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "seq_len", "save_steps",
                     "logging_steps"):
            _check_whole(name, getattr(self, name), minimum=1)
        _check_whole("warmup_steps", self.warmup_steps, minimum=0)
        if self.max_sequences is not None:
            _check_whole("max_sequences", self.max_sequences, minimum=1)
        _check_number("learning_rate", self.learning_rate, "a positive number", lambda v: v > 0)
        _check_number("weight_decay", self.weight_decay, "a number >= 0", lambda v: v >= 0)
        _check_number("max_grad_norm", self.max_grad_norm, "a positive number", lambda v: v > 0)
        _check_number("alpha", self.alpha, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("temperature", self.temperature, "a positive number", lambda v: v > 0)
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


def _check_number(name: str, value: Any, wanted: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")
