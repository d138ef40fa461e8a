"""`hf-moeprune finetune`: a short recovery fine-tune of a reduced checkpoint, optionally distilled from the original."""

from __future__ import annotations

import argparse
import dataclasses

from ..finetuning.args import FinetuneArgs

NAME = "finetune"
HELP = "Fine-tune a reduced checkpoint briefly (optionally distilling from the original) and save it."
DESCRIPTION = (
    "Train a reduced checkpoint for a few steps on calibration or task text with transformers' Trainer, so it\n"
    "recovers some of the quality that pruning or merging cost. With a teacher (by default the model it was\n"
    "reduced from, when that folder exists here) the loss mixes the LM loss with the KL divergence to the\n"
    "teacher's next-token distribution. The result keeps its format (uniform, per-layer counts, tied router)\n"
    "and its record, with the fine-tune added; an interrupted run continues with --resume.\n\n"
    "example:\n"
    "  hf-moeprune finetune --model PRUNED --data task.jsonl --max-steps 200 --output PRUNED-ft"
)
_TYPES = {"int": (int, "N"), "float": (float, "X"), "str": (str, "NAME"), "int | None": (int, "N"),
          "str | None": (str, "NAME")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="The reduced checkpoint to fine-tune.")
    parser.add_argument("--teacher", default="auto", metavar="DIR|HUB_ID|none",
                        help="Checkpoint whose logits to distil from; auto: the model it was reduced from when that "
                        "is a local folder that exists; none: no distillation.")
    data = parser.add_argument_group("training data")
    data.add_argument("--data", "--calibration", dest="calibration", metavar="FILE|FOLDER|DATASET",
                      help="A data file (.txt with blank-line separated documents, .json, .jsonl, .csv, .tsv, "
                      ".parquet), a folder, a `save_to_disk` folder or a Hub dataset id (default: the bundled "
                      "seven-domain calibration sample).")
    data.add_argument("--split", help="Split of a folder, saved dataset or Hub dataset (default: train).")
    data.add_argument("--text-column", metavar="NAME", help="Column holding the text (default: text).")
    data.add_argument("--num-samples", type=int, metavar="N", help="Use only the first N rows (default: all).")
    data.add_argument("--chat-template", action="store_true",
                      help="Rows are chat messages: render them with the tokenizer's chat template.")
    training = parser.add_argument_group("training")
    for field in dataclasses.fields(FinetuneArgs):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            training.add_argument(flag, action="store_true", help=field.metadata["help"])
        else:
            kind, metavar = _TYPES[field.type]
            training.add_argument(flag, type=kind, default=field.default, metavar=metavar, help=field.metadata["help"])
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder for the fine-tuned checkpoint (new or "
                        "empty).")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it holds an earlier hf_moeprune "
                        "checkpoint (never other data), and discard an interrupted run.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue an interrupted run of the same command from its last training checkpoint.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def finetune_args_from(args: argparse.Namespace) -> FinetuneArgs:
    """The training options as `FinetuneArgs`; a refusal names the command-line flag."""
    try:
        return FinetuneArgs(**{field.name: getattr(args, field.name) for field in dataclasses.fields(FinetuneArgs)})
    except ValueError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        raise ValueError(message.replace(field, "--" + field.replace("_", "-"), 1)) from None


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import check_output_dir
    from ._recipe import _with_cli_names, check_chat_template, check_model_path, read_calibration

    training = finetune_args_from(args)
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}.")
    check_model_path(args.model)
    teacher = None if args.teacher.lower() == "none" else args.teacher
    for source in (args.model, teacher):
        _with_cli_names(check_output_dir, args.output, overwrite=args.overwrite, source=source)
    if args.chat_template:
        check_chat_template(args.model)
    if args.no_progress:
        from ..progress import disable_progress_bars

        disable_progress_bars()
    rows, description = read_calibration(args)
    from ..finetuning import finetune

    try:
        model = _with_cli_names(
            finetune, args.model, rows, args.output, training, teacher=teacher, overwrite=args.overwrite,
            resume=args.resume, progress=not args.no_progress, description=description, chat_template=args.chat_template,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        raise type(error)(str(error).replace("teacher=", "--teacher ")) from error
    step = model.record["steps"][-1]
    teacher_note = f", distilled from {step['teacher']}" if step["teacher"] else ""
    print(f"Fine-tuned {training.max_steps} steps on {step['tokens_seen']:,} tokens{teacher_note}; "
          f"last logged loss {step['train_loss']:.4f}")
    print(f"Saved {args.output}")
    return 0
