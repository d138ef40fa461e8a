"""User-facing wrappers: load an MoE model, prune or merge its experts, save or publish the result.

`MoEPruneModel` wraps a transformers model (forward, generate and attributes pass through), keeps the
`moeprune` record of everything done to it, and writes checkpoints that load with plain transformers.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import prepare_calibration
from .checkpoint import save_checkpoint
from .config import MoEPruneConfig
from .families import FamilySpec, family_for_model
from .families.registry import registered_families_by_type
from .methods import get_method
from .models import register_models
from .moe_layers import MoELayer, find_moe_layers
from .pipeline.runner import StepReport, run_step
from .pipeline.sources import InMemorySource, check_finite_weights
from .records import RECORD_KEY, compose_layer, count_parameters, initial_record, is_uniform, needs_loader
from .surgery import ReductionPlan, apply_plan


class MoEPruneModel(nn.Module):
    """A transformers MoE model plus the record of the expert methods applied to it.

    Args:
        model: A loaded transformers model of a registered family.
        tokenizer: Used to tokenise string calibration sets and saved beside the weights.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.progress = True  # progress bars of calibration sweeps
        self.spec: FamilySpec = family_for_model(model)
        existing = getattr(model.config, RECORD_KEY, None)
        self.record: dict[str, Any] = (
            copy.deepcopy(existing)
            if existing
            else initial_record(model.config.name_or_path or "", self.spec.name, self.moe_layers(), model)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def moe_layers(self) -> list[MoELayer]:
        return find_moe_layers(self.model, self.spec)

    def prune_experts(
        self,
        config: MoEPruneConfig,
        calibration: Any = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        **calibration_options: Any,
    ) -> MoEPruneModel:
        """Remove experts (or zero weights inside them) with a registered method; returns self.

        Args:
            config: The recipe, e.g. `MoEPruneConfig(method="frequency", experts_per_layer=4)`.
            calibration: Texts (with a tokenizer), a `datasets.Dataset` with a `text` column, or token ids.
                Data-free methods ignore it.
            tokenizer: Overrides the tokenizer loaded with the model.
            device: Run each decoder layer there in turn (e.g. `"cuda"` for a model kept in host memory);
                default: where the model is.
            **calibration_options: `seq_len`, `batch_size`, `max_sequences`, `text_column`, `description`.
        """
        return self._apply(config, calibration, tokenizer, ("prune", "unstructured"), device, calibration_options)

    def merge_experts(
        self,
        config: MoEPruneConfig,
        calibration: Any = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        **calibration_options: Any,
    ) -> MoEPruneModel:
        """Merge groups of experts into one with a registered merge method; returns self (arguments as
        for `prune_experts`)."""
        return self._apply(config, calibration, tokenizer, ("merge",), device, calibration_options)

    @torch.no_grad()
    def _apply(
        self,
        config: MoEPruneConfig,
        calibration: Any,
        tokenizer: Any,
        kinds: tuple[str, ...],
        device: str | torch.device | None,
        calibration_options: dict[str, Any],
    ) -> MoEPruneModel:
        method_class = get_method(config.method)
        if method_class.kind not in kinds:
            verb = "merge_experts" if method_class.kind == "merge" else "prune_experts"
            raise ValueError(f"Method {config.method!r} is a {method_class.kind} method: call {verb}().")
        method = method_class(config)
        layers = self.moe_layers()
        check_finite_weights(self.model)
        method.validate(layers)
        data = None
        if method.needs_calibration:
            options = {"vocab_size": getattr(self.model.config, "vocab_size", None), **calibration_options}
            data = prepare_calibration(calibration, tokenizer or self.tokenizer, **options)
        source = InMemorySource(self.model, layers, torch.device(device) if device is not None else None)
        report = run_step(lambda phase: source, method, data.batches if data is not None else None, progress=self.progress)
        self.record_step(config, report, data.record() if data is not None else None)
        return self

    def record_step(self, config: MoEPruneConfig, report: StepReport, calibration: dict[str, Any] | None) -> None:
        """Add a finished step to the record (expert maps composed with earlier steps) and the config."""
        self._record_plan(report.plan, self.moe_layers())
        if report.weight_sparsity:
            self.record.setdefault("weight_sparsity", {}).update(report.weight_sparsity)
        self.record["steps"].append(
            {
                "method": config.method,
                "config": config.to_dict(),
                "calibration": calibration,
                "forward_passes": report.forward_passes,
                **({"details": report.details} if report.details else {}),
            }
        )
        params, nbytes = count_parameters(self.model)
        self.record["parameters"]["after"], self.record["bytes"]["after"] = params, nbytes
        setattr(self.model.config, RECORD_KEY, copy.deepcopy(self.record))

    def apply_plan(self, plan: ReductionPlan, layers: list[MoELayer] | None = None) -> None:
        """Apply a hand-made plan and keep the record and config counts in step with it."""
        layers = layers if layers is not None else self.moe_layers()
        apply_plan(layers, plan)
        self._record_plan(plan, layers)

    def _record_plan(self, plan: ReductionPlan, layers: list[MoELayer]) -> None:
        for path, layer_plan in plan.layers.items():
            layer = next(item for item in layers if item.path == path)
            self.record["layers"][path] = compose_layer(self.record["layers"][path], layer_plan, layer.top_k)
        self._sync_config_counts(plan.top_k)
        self.record["uniform"] = is_uniform(self.record)
        setattr(self.model.config, RECORD_KEY, copy.deepcopy(self.record))

    def _sync_config_counts(self, top_k: int | None) -> None:
        counts = [entry["num_experts"] for entry in self.record["layers"].values()]
        setattr(self.model.config, self.spec.num_experts_key, max(counts))
        if top_k is not None and self.spec.top_k_key:
            setattr(self.model.config, self.spec.top_k_key, top_k)

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any) -> Path:
        """Write the checkpoint atomically (staging folder swapped into place) with its model card.

        An existing non-empty folder is replaced only with `overwrite=True` and only if it is an earlier
        hf_moeprune checkpoint; the folder the model was loaded from is never replaced (checked before
        anything is written, see `checkpoint.check_output_dir`).
        """
        setattr(self.model.config, RECORD_KEY, copy.deepcopy(self.record))
        return save_checkpoint(
            self.model,
            self.moe_layers(),
            self.record,
            save_directory,
            tokenizer=self.tokenizer,
            task=self.spec.task,
            extra_files=lambda folder: _write_card(folder, Path(save_directory).resolve().name),
            overwrite=overwrite,
            source=getattr(self.model.config, "name_or_path", None),
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        **save_kwargs: Any,
    ) -> str:
        """Save to a temporary folder (weights, config, tokenizer, generated card) and upload it.

        The arguments are those of transformers' `push_to_hub`; nothing local changes if the upload fails.
        """
        from .hub import push_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], **save_kwargs)
            return push_checkpoint(
                folder, repo_id, private=private, token=token, revision=revision, commit_message=commit_message,
                commit_description=commit_description, create_pr=create_pr, tags=tags,
            )

    def summary(self) -> list[dict[str, Any]]:
        """Per MoE layer: path, experts now and originally, top-k."""
        return [
            {
                "layer": layer.path,
                "num_experts": layer.num_experts,
                "original_num_experts": self.record["layers"][layer.path]["original_num_experts"],
                "top_k": layer.top_k,
            }
            for layer in self.moe_layers()
        ]


def _write_card(folder: Path, model_name: str) -> None:
    from .hub import write_model_card

    write_model_card(folder, model_name=model_name)


class _AutoMoEPruneModel:
    """Loads a checkpoint of a registered family, including non-uniform hf_moeprune results."""

    task: str

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MoEPruneModel:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kwargs}
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
        spec = registered_families_by_type().get(config.model_type)
        if spec is not None and spec.task != cls.task:
            raise ValueError(f"{config.model_type!r} is a {spec.task} family; use the matching AutoMoEPrune class.")
        model_class = model_class_for_config(config, cls.task)
        model = model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return MoEPruneModel(model, tokenizer)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None) -> MoEPruneModel:
        return MoEPruneModel(model, tokenizer)


def model_class_for_config(config: Any, task: str = "causal-lm") -> type:
    """The transformers class that loads a checkpoint with `config`: the family's own Auto class, subclassed to
    build each MoE layer with its recorded expert count (and tied router map) when the record needs it."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .nonuniform import with_per_layer_experts

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSeq2SeqLM
    base = auto._model_mapping[type(config)]
    record = getattr(config, RECORD_KEY, None) or {}
    if not needs_loader(record):
        return base
    return with_per_layer_experts(base)


def load_pretrained_model(path: str | os.PathLike, task: str = "causal-lm", **kwargs: Any) -> nn.Module:
    """Any checkpoint as a plain transformers model, MoE or dense, per-layer expert counts honoured.

    For evaluation and benchmarks, which need the model and not the pruning wrapper. `kwargs` go to
    `from_pretrained` (`dtype`, `gguf_file`, `revision`, ...).
    """
    from transformers import AutoConfig

    config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "gguf_file") if k in kwargs}
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    return model_class_for_config(config, task).from_pretrained(path, config=config, **kwargs)


class AutoMoEPruneModelForCausalLM(_AutoMoEPruneModel):
    """`AutoMoEPruneModelForCausalLM.from_pretrained(path)` for decoder-only MoE families."""

    task = "causal-lm"


class AutoMoEPruneModelForSeq2SeqLM(_AutoMoEPruneModel):
    """`AutoMoEPruneModelForSeq2SeqLM.from_pretrained(path)` for encoder-decoder MoE families (Switch)."""

    task = "seq2seq-lm"


# Whoever loads models through this module can also load Arctic checkpoints with transformers' Auto classes.
register_models()
