"""`finetune(model_or_path, texts, output)`: a short recovery fine-tune of a reduced model, saved beside its record.

The model loads through hf_moeprune's one loader, so uniform, non-uniform and tied-router results train and are
saved back in their own format. Training runs in float32 with transformers' `Trainer`; its checkpoints go to
`.OUT.moeprune-finetune` beside the output, from which `resume=True` continues an interrupted run, and the result
is swapped into place by the atomic save of every hf_moeprune checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import CalibrationData, prepare_calibration
from ..checkpoint import check_output_dir
from ..modeling import AutoMoEPruneModelForCausalLM, MoEPruneModel, load_pretrained_model
from ..progress import progress_bars_disabled
from ..records import RECORD_KEY, finetune_step, looks_like_hub_repo_id
from .args import FinetuneArgs

logger = logging.getLogger(__name__)

STAGING_TAG = "moeprune-finetune"
FINGERPRINT_FILE = "finetune_run.json"
AUTO = "auto"


class PackedSequences(torch.utils.data.Dataset):
    """Rows of packed token ids, as the Trainer's default collator stacks them."""

    def __init__(self, data: CalibrationData) -> None:
        self.sequences = torch.cat(data.batches)

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[index]}


def finetune(
    model_or_path: str | os.PathLike | nn.Module,
    texts: Any,
    output: str | os.PathLike,
    args: FinetuneArgs | None = None,
    *,
    teacher: str | os.PathLike | nn.Module | None = AUTO,
    tokenizer: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    description: str | None = None,
    **data_options: Any,
) -> MoEPruneModel:
    """Fine-tune a (reduced) model on `texts`, optionally distilling from a teacher, and save it to `output`.

    Args:
        model_or_path: A checkpoint folder or Hub id, a `MoEPruneModel` or a transformers model.
        texts: What `calibration=` takes: texts, a data file, folder or Hub dataset id, a `datasets.Dataset` or
            token ids; packed into blocks of `args.seq_len` tokens.
        output: The folder for the result (new or empty; an earlier hf_moeprune checkpoint with `overwrite`).
        args: Steps, learning rate, distillation weight... (`FinetuneArgs`).
        teacher: A checkpoint folder, Hub id or model whose logits to distil from; `"auto"` (default): the
            recorded base model when it is a local folder that exists; None: no distillation. Unused when
            `args.alpha` is 0.
        tokenizer: Overrides the model's tokenizer (needed for texts).
        overwrite: Replace `output` if it is an earlier hf_moeprune checkpoint, and discard an interrupted run.
        resume: Continue an interrupted run of the same model, data and arguments from its last checkpoint.
        progress: Show the Trainer's progress bar.
        callbacks: Extra `transformers.TrainerCallback`s.
        description: How the data is named in the record and card (default: derived from `texts`).
        **data_options: `split`, `text_column`, `num_samples`, `chat_template`, as for calibration data.

    Returns:
        The trained `MoEPruneModel`, in the saved dtype, with the fine-tune appended to its record.
    """
    args = args or FinetuneArgs()
    source = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else None
    wrapper = None if source is not None else _wrap(model_or_path, tokenizer)
    config, record, tokenizer = _describe_input(source, wrapper, tokenizer)
    teacher = _default_teacher(record) if isinstance(teacher, str) and teacher == AUTO else teacher
    teacher = teacher if args.alpha > 0 else None
    teacher_path = teacher if isinstance(teacher, (str, os.PathLike)) else None
    for folder in (getattr(config, "name_or_path", None), source, teacher_path):  # never written into
        check_output_dir(output, overwrite=overwrite, source=folder)
    teacher_name = _check_teacher(teacher, config)
    data = prepare_calibration(
        texts, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size, max_sequences=args.max_sequences,
        vocab_size=getattr(config, "vocab_size", None), description=description, **data_options,
    )
    output_dir = Path(output).expanduser().resolve()
    staging = output_dir.parent / f".{output_dir.name}.{STAGING_TAG}"
    fingerprint = {"input": str(getattr(config, "name_or_path", "")), "args": args.to_dict(),
                   "data": data.record(), "teacher": teacher_name}
    checkpoint = _previous_run(staging, fingerprint, resume=resume, overwrite=overwrite)

    wrapper = wrapper or _load(source, tokenizer)
    save_dtype = _save_dtype(args, config, wrapper.model)
    teacher_model = _load_teacher(teacher)
    wrapper.model.float()
    try:
        state = _train(wrapper, data, args, staging, fingerprint, checkpoint, teacher_model, progress, callbacks)
        _save(wrapper, args, data, state, teacher_name, save_dtype, output, overwrite)
    except BaseException:
        from transformers.trainer_utils import get_last_checkpoint

        if staging.is_dir() and get_last_checkpoint(str(staging)) is not None:
            logger.warning("Interrupted: training checkpoints are kept in %s; run the same command with --resume / "
                           "resume=True to continue.", staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return wrapper


def _save(wrapper: MoEPruneModel, args: FinetuneArgs, data: CalibrationData, state: Any, teacher_name: str | None,
          dtype: torch.dtype, output: str | os.PathLike, overwrite: bool) -> None:
    """Cast to the saved dtype (the returned model is then the saved one), record the step and save atomically."""
    wrapper.model.to(dtype).eval()
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    wrapper.record["steps"].append(finetune_step(
        args.to_dict(), data.record(), int(state.num_input_tokens_seen), teacher_name,
        float(losses[-1]) if losses else float("nan"),
    ))
    setattr(wrapper.model.config, RECORD_KEY, wrapper.record)
    wrapper.save_pretrained(output, overwrite=overwrite)


def _describe_input(
    source: str | os.PathLike | None, wrapper: MoEPruneModel | None, tokenizer: Any
) -> tuple[Any, dict[str, Any], Any]:
    """The config, record and tokenizer of the input: the wrapped model's, or a checkpoint's without its weights."""
    if wrapper is not None:
        return wrapper.model.config, wrapper.record, wrapper.tokenizer
    from transformers import AutoConfig, AutoTokenizer

    from ..families import family_for_model_type

    config = AutoConfig.from_pretrained(source)
    _check_decoder_only(family_for_model_type(config.model_type).task)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return config, getattr(config, RECORD_KEY, None) or {}, tokenizer


def _wrap(model: nn.Module, tokenizer: Any) -> MoEPruneModel:
    wrapper = model if isinstance(model, MoEPruneModel) else MoEPruneModel(model, tokenizer)
    _check_decoder_only(wrapper.spec.task)
    if tokenizer is not None:
        wrapper.tokenizer = tokenizer
    return wrapper


def _check_decoder_only(task: str) -> None:
    if task != "causal-lm":
        raise ValueError("finetune trains decoder-only (causal LM) models; encoder-decoder models such as Switch "
                         "are not supported yet.")


def _load(source: str | os.PathLike, tokenizer: Any) -> MoEPruneModel:
    wrapper = AutoMoEPruneModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    wrapper.tokenizer = tokenizer or wrapper.tokenizer
    return wrapper


def _save_dtype(args: FinetuneArgs, config: Any, model: nn.Module) -> torch.dtype:
    """`args.dtype`, else the checkpoint's recorded dtype, else the in-memory model's."""
    chosen = args.dtype or getattr(config, "dtype", None)
    if isinstance(chosen, str):
        return getattr(torch, chosen)
    return chosen if isinstance(chosen, torch.dtype) else next(model.parameters()).dtype


def _default_teacher(record: dict[str, Any]) -> str | None:
    """The model the record was reduced from, when it is a local checkpoint folder that exists here."""
    for candidate in ((record.get("recipe") or {}).get("model"), record.get("base_model")):
        if candidate and (Path(candidate).expanduser() / "config.json").is_file():
            return str(candidate)
    return None


def _check_teacher(teacher: Any, config: Any) -> str | None:
    """The teacher's name for the record; refuses one whose vocabulary differs, before any weights load."""
    if teacher is None:
        return None
    if isinstance(teacher, nn.Module):
        teacher_config, name = teacher.config, str(getattr(teacher.config, "name_or_path", "") or "in-memory model")
    else:
        from transformers import AutoConfig

        name = str(teacher)
        if not Path(name).expanduser().is_dir() and not looks_like_hub_repo_id(name):
            raise FileNotFoundError(f"teacher={name}: no such folder.")
        teacher_config = AutoConfig.from_pretrained(name)
    if getattr(teacher_config, "vocab_size", None) != getattr(config, "vocab_size", None):
        raise ValueError(f"teacher={name} has a vocabulary of {teacher_config.vocab_size} tokens, the model "
                         f"{config.vocab_size}: distillation needs the same tokenizer; choose the model it came from.")
    return name


def _load_teacher(teacher: Any) -> nn.Module | None:
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    return load_pretrained_model(teacher, dtype=torch.float32)


def _previous_run(staging: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> str | None:
    """The Trainer checkpoint to resume from, or None to start afresh; refuses to discard or mix up a run."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(staging)) if staging.is_dir() else None
    if last is None:
        if resume:
            logger.warning("Nothing to resume beside the output (no checkpoint in %s); starting from step 0.", staging)
        shutil.rmtree(staging, ignore_errors=True)
        return None
    if not resume:
        if overwrite:
            shutil.rmtree(staging)
            return None
        raise FileExistsError(f"{staging} holds an interrupted fine-tune of this output ({Path(last).name}); pass "
                              "--resume / resume=True to continue it, or --overwrite / overwrite=True to start over.")
    fingerprint_file = staging / FINGERPRINT_FILE
    saved = json.loads(fingerprint_file.read_text()) if fingerprint_file.is_file() else None
    if saved != json.loads(json.dumps(fingerprint)):
        raise ValueError(f"{staging} holds an interrupted fine-tune of a different model, data or arguments; rerun "
                         "that exact command with --resume, or pass --overwrite without --resume to start over.")
    logger.warning("Resuming from %s.", last)
    return last


def _train(wrapper: MoEPruneModel, data: CalibrationData, args: FinetuneArgs, staging: Path,
           fingerprint: dict[str, Any], checkpoint: str | None, teacher: nn.Module | None, progress: bool,
           callbacks: Sequence[Any]) -> Any:
    """Run the Trainer (resuming from `checkpoint`) and return its final state."""
    from transformers import TrainingArguments

    from .trainer import DistillationTrainer, KeepZeros, sparse_parameters

    staging.mkdir(parents=True, exist_ok=True)
    (staging / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))
    training_args = TrainingArguments(
        output_dir=str(staging), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, seed=args.seed, data_seed=args.seed, logging_steps=args.logging_steps,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=1, report_to="none",
        disable_tqdm=not progress or progress_bars_disabled(), include_num_input_tokens_seen="all",
        bf16=args.bf16, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
    )
    pruned = sparse_parameters(wrapper.model, wrapper.record)
    trainer = DistillationTrainer(
        model=wrapper.model, args=training_args, train_dataset=PackedSequences(data), teacher=teacher,
        alpha=args.alpha, temperature=args.temperature,
        callbacks=[*([KeepZeros(pruned)] if pruned else []), *callbacks],
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.state
