"""Evaluation harness: held-out perplexity (overall, per domain, per topic) and log-likelihood multiple-choice
tasks scored as lm-evaluation-harness does, on data that installs offline.

    >>> from hf_moeprune.evaluate import evaluate_model
    >>> rows = evaluate_model(model, tokenizer, tasks=["ppl", "arc_easy"], limit=100, batch_size=8)
    >>> rows[0]
    {'task': 'ppl', 'metric': 'perplexity', 'value': ..., 'stderr': ..., 'n': ..., 'tokens': ...}
"""

from .harness import (
    EVAL_RESULTS_FILE,
    check_tasks,
    evaluate_model,
    heldout_subset,
    multiple_choice,
    perplexity_rows,
    save_results,
)
from .scoring import encode_pair, loglikelihoods, perplexity
from .tasks import TASKS, MultipleChoiceTask, known_tasks, load_documents, register_task

__all__ = [
    "EVAL_RESULTS_FILE",
    "TASKS",
    "MultipleChoiceTask",
    "check_tasks",
    "encode_pair",
    "evaluate_model",
    "heldout_subset",
    "known_tasks",
    "load_documents",
    "loglikelihoods",
    "multiple_choice",
    "perplexity",
    "perplexity_rows",
    "register_task",
    "save_results",
]
