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
        model = load_pretrained_model(folder, dtype=getattr(torch, args.dtype), **extra)
    except (OSError, ValueError) as error:
        print(f"hf-moeprune eval: error: cannot load {folder}: {error}", file=sys.stderr)
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
