"""transformers' `Trainer` with a distillation loss, and the callback that keeps pruned weights at zero."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the next-token distributions softened by `temperature`, averaged over tokens.

    The T^2 factor keeps the gradient's size independent of T (Hinton et al., https://arxiv.org/abs/1503.02531).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return per_token.mean() * temperature**2


def language_model_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; packed sequences carry no padding, so every position counts."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


class DistillationTrainer(Trainer):
    """Trains on `(1 - alpha) x LM loss + alpha x distillation loss` when a teacher is given, else the LM loss.

    The loss is computed here from the logits (the model's own loss would add a router auxiliary loss that assumes
    one expert count per layer), as a mean over the batch's tokens, so the Trainer divides it by the accumulation
    steps (`loss_is_scaled_for_ga = False`).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module | None = None, alpha: float = 0.0, temperature: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False) if teacher is not None else None
        self.alpha = alpha
        self.temperature = temperature
        self._parts: dict[str, list[float]] = {}  # loss components since the last log

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        input_ids = inputs["input_ids"]
        outputs = model(input_ids=input_ids, use_cache=False)
        loss = language_model_loss(outputs.logits, input_ids)
        if self.teacher is not None and self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
            distill = distillation_loss(outputs.logits, teacher_logits, self.temperature)
            self._parts.setdefault("lm_loss", []).append(loss.item())
            self._parts.setdefault("distill_loss", []).append(distill.item())
            loss = (1 - self.alpha) * loss + self.alpha * distill
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """With a teacher, the logged loss is the mix: its two parts are logged beside it."""
        if "loss" in logs:
            logs.update({name: round(sum(values) / len(values), 4) for name, values in self._parts.items()})
            self._parts = {}
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Reload the weights through the model class's own `from_pretrained`.

        transformers 5 saves fused MoE experts in the Hub's per-expert layout (`block_sparse_moe.experts.N.w1`), and
        the Trainer's own loader reads that file without converting back: the experts, routers of every MoE layer
        would silently keep their pre-resume values (only a "missing keys" warning). Measured with 5.24.
        """
        model = model if model is not None else self.model
        saved = type(model).from_pretrained(resume_from_checkpoint, config=model.config, dtype=torch.float32)
        model.load_state_dict(saved.state_dict(), strict=True)


class KeepZeros(TrainerCallback):
    """Re-zeroes the weights an unstructured method (Wanda, OWL) set to zero after every optimizer step, so the
    sparsity recorded in the checkpoint stays true (AdamW's update and weight decay would fill them in)."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.pruned = [(parameter, parameter.detach() == 0) for parameter in parameters]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            for parameter, zero in self.pruned:
                parameter.masked_fill_(zero.to(parameter.device), 0)


def sparse_parameters(model: nn.Module, record: dict[str, Any]) -> list[nn.Parameter]:
    """The parameters named in the record's `weight_sparsity` (a parameter, or a linear module's `.weight`)."""
    parameters = dict(model.named_parameters())
    found = []
    for name in record.get("weight_sparsity") or {}:
        parameter = parameters.get(name, parameters.get(f"{name}.weight"))
        if parameter is None:
            raise ValueError(f"The record's weight_sparsity names {name!r}, which the model does not have; the "
                             "checkpoint's config.json does not match its weights.")
        found.append(parameter)
    return found
