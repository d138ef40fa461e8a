"""Evaluation through lm-evaluation-harness: held-out perplexity (overall, per domain, per topic), the user's
own text, and log-likelihood multiple-choice tasks, from task YAMLs over data that installs offline.

    >>> from hf_moeprune.evaluate import evaluate_model
    >>> rows = evaluate_model(model, tokenizer, tasks=["ppl", "arc_easy"], limit=100, batch_size=8)
    >>> rows[0]
    {'task': 'ppl', 'metric': 'perplexity', 'value': ..., 'stderr': ..., 'n': ..., 'tokens': ...}

The same tasks run from lm-eval's own CLI: `lm_eval --include_path <this folder>/tasks --tasks arc_easy ...`.
"""

from .compare import compare_rows, format_table
from .harness import (
    EVAL_RESULTS_FILE,
    TASK_DIR,
    check_tasks,
    evaluate_model,
    known_tasks,
    run_lm_eval,
    save_results,
    task_manager,
)
from .perplexity import heldout_subset, perplexity, perplexity_rows, summary
from .text import load_text

__all__ = [
    "EVAL_RESULTS_FILE",
    "TASK_DIR",
    "check_tasks",
    "compare_rows",
    "evaluate_model",
    "format_table",
    "heldout_subset",
    "known_tasks",
    "load_text",
    "perplexity",
    "perplexity_rows",
    "run_lm_eval",
    "save_results",
    "summary",
    "task_manager",
]
