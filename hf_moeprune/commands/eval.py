"""`hf-moeprune eval`: held-out perplexity and multiple-choice accuracy of a model, as JSON rows."""

from __future__ import annotations

import argparse
import sys

NAME = "eval"
HELP = (
    "Evaluate a causal LM: held-out perplexity (overall, per domain and topic) and log-likelihood "
    "multiple-choice tasks (acc, acc_norm), written as JSON rows {task, metric, value, stderr, n}."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Model folder (default: the embedded 8-expert testbed, no network)."
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model to load from.")
    parser.add_argument(
        "--tasks", default="ppl", help="Comma-separated task names, e.g. ppl,arc_easy,piqa (default: ppl)."
    )
    parser.add_argument("--limit", type=int, default=None, help="At most N documents per task.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass (default 8).")
    parser.add_argument(
        "--ppl-window", type=int, default=256, help="Tokens per perplexity window (default 256)."
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--output", default=None, help="Write the rows to this JSON file.")
    parser.add_argument(
        "--save-to-checkpoint",
        action="store_true",
        help="Also write eval_results.json into the model folder (read by the model card generator).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hf_moeprune.evaluate import EVAL_RESULTS_FILE, check_tasks, evaluate_model, save_results

    try:
        tasks = check_tasks(args.tasks.split(","))
    except ValueError as error:
        print(f"hf-moeprune eval: error: {error}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer

    from hf_moeprune.modeling import load_pretrained_model
    from hf_moeprune.testbed import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else default_model_path()
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model, info = load_pretrained_model(
            folder, dtype=getattr(torch, args.dtype), output_loading_info=True, **extra
        )
    except (OSError, ValueError) as error:
        print(f"hf-moeprune eval: error: cannot load {folder}: {error}", file=sys.stderr)
        return 1
    problem = loading_problem(info)
    if problem:  # transformers initialises such weights at random: any score would be meaningless
        print(f"hf-moeprune eval: error: {folder} did not load cleanly: {problem}", file=sys.stderr)
        return 1
    model.eval()
    rows = evaluate_model(
        model,
        tokenizer,
        tasks=tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        ppl_window=args.ppl_window,
        progress=not args.no_progress,
    )
    print(json.dumps(rows, indent=2))
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
