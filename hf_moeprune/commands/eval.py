"""`hf-moeprune eval`: lm-evaluation-harness on a checkpoint, printed as a table, optionally next to its base."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "eval"
HELP = (
    "Evaluate a causal LM with lm-evaluation-harness: held-out perplexity (overall, per domain and topic), your "
    "own text (--data) and multiple-choice tasks (acc, acc_norm); --compare BASE puts the base model alongside."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Model folder (default: the embedded 8-expert testbed, no network)."
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model to load from.")
    parser.add_argument(
        "--tasks",
        default=None,
        help="Comma-separated task names, e.g. ppl,arc_easy,piqa (default: ppl, or none with --data).",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="Score the perplexity of your own text: .txt/.md (blank-line separated documents), or .jsonl, .json, "
        ".csv, .tsv, .parquet or .arrow with a 'text' column, optionally compressed (.gz, .bz2, .xz, .zst), or a "
        "save_to_disk folder (task 'ppl_data').",
    )
    parser.add_argument(
        "--compare", default=None, metavar="BASE", help="Also evaluate this model folder and show both side by side."
    )
    parser.add_argument("--limit", type=int, default=None, help="At most N documents per task.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass (default 8).")
    parser.add_argument(
        "--ppl-window", type=int, default=256, help="Tokens per perplexity window (default 256)."
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument(
        "--output", default=None, help="Write the rows (with --compare: the side-by-side rows) to this JSON file."
    )
    parser.add_argument(
        "--save-to-checkpoint",
        action="store_true",
        help="Also write eval_results.json into the model folder (the model card's model-index reads it).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _load(folder: Path, args: argparse.Namespace):
    """Model and tokenizer of a checkpoint (uniform or with per-layer expert counts), refused when
    transformers would fill some weights at random (any score would be meaningless)."""
    import torch
    from transformers import AutoTokenizer

    from hf_moeprune.modeling import load_pretrained_model

    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    if args.no_progress:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    if not folder.exists():
        raise FileNotFoundError(f"no such model folder: {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model, info = load_pretrained_model(
            folder, dtype=getattr(torch, args.dtype), output_loading_info=True, **extra
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load {folder}: {error}") from error
    problem = loading_problem(info)
    if problem:
        raise RuntimeError(f"{folder} did not load cleanly: {problem}")
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    from hf_moeprune.evaluate import (
        EVAL_RESULTS_FILE,
        check_tasks,
        compare_rows,
        evaluate_model,
        format_table,
        save_results,
    )
    from hf_moeprune.evaluate.text import check_text_source

    tasks = check_tasks(args.tasks.split(",")) if args.tasks is not None else ([] if args.data else ["ppl"])
    if args.data is not None:
        check_text_source(args.data)
    if not tasks and args.data is None:
        raise ValueError("--tasks is empty; name a task (e.g. ppl) or give --data FILE.")
    if args.compare is not None and not Path(args.compare).exists():
        raise FileNotFoundError(f"--compare: no such model folder: {args.compare}")

    import torch

    from hf_moeprune.testbed import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else default_model_path()

    def score(path: Path) -> list[dict]:
        model, tokenizer = _load(path, args)
        return evaluate_model(
            model,
            tokenizer,
            tasks=tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data=args.data,
            ppl_window=args.ppl_window,
            progress=not args.no_progress,
        )

    rows = score(folder)
    if args.compare is not None:
        compared = compare_rows(score(Path(args.compare)), rows)
        print(format_table(compared, names=(Path(args.compare).name, folder.name)))
        if args.output:
            save_results(compared, args.output)
    else:
        print(format_table(rows))
        if args.output:
            save_results(rows, args.output)
    inside = args.output and folder.is_dir() and Path(args.output).resolve().parent == folder.resolve()
    if args.save_to_checkpoint or (inside and Path(args.output).name != EVAL_RESULTS_FILE):
        save_results(rows, folder / EVAL_RESULTS_FILE)
    return 0


def loading_problem(info: dict) -> str | None:
    """A sentence naming missing or mismatched weights in transformers' loading info, or None when clean."""
    parts = []
    missing = list(info.get("missing_keys") or [])
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the checkpoint (e.g. {missing[0]})")
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        first = mismatched[0][0] if isinstance(mismatched[0], (tuple, list)) else mismatched[0]
        parts.append(f"{len(mismatched)} weight(s) with the wrong shape (e.g. {first})")
    if not parts:
        return None
    return "; ".join(parts) + ". Check that config.json matches the weights."
