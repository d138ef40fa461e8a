"""`evaluate_model`: held-out perplexity and multiple-choice accuracy as rows {task, metric, value, stderr, n}."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .scoring import loglikelihoods, perplexity
from .tasks import TASKS, known_tasks

EVAL_RESULTS_FILE = "eval_results.json"


def _mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean as lm-evaluation-harness reports it (sample std with n - 1, over sqrt(n))."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names, validated; raises `ValueError` listing the known tasks for an unknown one."""
    names = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in names if t not in known_tasks()]
    if unknown:
        raise ValueError(f"Unknown task(s) {', '.join(unknown)}. Known tasks: {', '.join(known_tasks())}.")
    if not names:
        raise ValueError(f"No task given. Known tasks: {', '.join(known_tasks())}.")
    return names


def multiple_choice(
    model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8, progress: bool = True
) -> list[dict[str, Any]]:
    """Accuracy (`acc`: highest summed log-likelihood) and `acc_norm` (highest log-likelihood per character
    of the choice, lm-eval's length normalisation) on the first `limit` documents of a task."""
    if task not in TASKS:
        raise ValueError(f"{task!r} is not a multiple-choice task. Known: {', '.join(sorted(TASKS))}.")
    instances = TASKS[task].instances(limit)
    requests = [request for instance in instances for request in instance.requests]
    scores = [
        s for s, _ in loglikelihoods(model, tokenizer, requests, batch_size, progress=progress, desc=task)
    ]
    acc, acc_norm, begin = [], [], 0
    for instance in instances:
        values = scores[begin : begin + len(instance.requests)]
        begin += len(instance.requests)
        normed = [v / max(len(c), 1) for v, c in zip(values, instance.choices, strict=True)]
        acc.append(float(max(range(len(values)), key=values.__getitem__) == instance.target))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == instance.target))
    n = len(instances)
    return [
        {"task": task, "metric": "acc", "value": sum(acc) / n, "stderr": _mean_stderr(acc), "n": n},
        {
            "task": task,
            "metric": "acc_norm",
            "value": sum(acc_norm) / n,
            "stderr": _mean_stderr(acc_norm),
            "n": n,
        },
    ]


def heldout_subset(documents: Sequence[Any], limit: int | None) -> list[Any]:
    """The first `limit` documents in a fixed pseudo-random order (by a hash of their name), so a small limit
    still mixes domains and topics; all of them when `limit` is None."""
    import hashlib

    if not limit:
        return list(documents)

    def key(document):
        name = getattr(document, "name", None) or str(document)[:200]
        return hashlib.sha256(name.encode()).hexdigest()

    return sorted(documents, key=key)[:limit]


def perplexity_rows(result: dict[str, Any], task: str = "ppl") -> list[dict[str, Any]]:
    """Rows for a `perplexity()` result: overall ("ppl"), per domain ("ppl/bbc") and per BBC topic
    ("ppl/bbc/sport"); Shakespeare's per-work figures stay in the `perplexity()` result."""
    rows = []

    def row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": name,
            "metric": "perplexity",
            "value": summary["perplexity"],
            "stderr": summary["stderr"],
            "n": summary["documents"],
            "tokens": summary["tokens"],
        }

    rows.append(row(task, result["overall"]))
    rows.extend(row(f"{task}/{domain}", s) for domain, s in result["domains"].items())
    rows.extend(
        row(f"{task}/{topic}", s) for topic, s in result["topics"].items() if topic.startswith("bbc/")
    )
    return rows


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str] = ("ppl",),
    limit: int | None = None,
    batch_size: int = 8,
    documents: Sequence[Any] | None = None,
    ppl_window: int = 256,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score a causal LM on held-out perplexity and/or multiple-choice tasks.

    Args:
        model: a causal LM (e.g. a testbed loaded with `AutoModelForCausalLM.from_pretrained`), in eval mode.
        tokenizer: its tokenizer.
        tasks (`Sequence[str]`): names from `known_tasks()`; "ppl" is perplexity on `documents`.
        limit (`int`, *optional*): at most this many documents per task (held-out documents for "ppl").
        batch_size (`int`): sequences per forward pass.
        documents (*optional*): documents for "ppl"; defaults to the testbed's bundled held-out set.
        ppl_window (`int`): tokens per perplexity window.
        progress (`bool`): show progress bars.

    Returns:
        `list[dict]`: rows {"task", "metric", "value", "stderr", "n"} (perplexity rows also carry "tokens").

    Example:
        >>> rows = evaluate_model(model, tokenizer, tasks=["ppl", "arc_easy"], limit=50)
    """
    names = check_tasks(tasks)
    rows: list[dict[str, Any]] = []
    for name in names:
        if name == "ppl":
            if documents is None:
                from ..testbed import heldout_documents

                documents = heldout_documents()
            subset = heldout_subset(documents, limit)
            result = perplexity(
                model, tokenizer, subset, window=ppl_window, batch_size=batch_size, progress=progress
            )
            rows.extend(perplexity_rows(result))
        else:
            rows.extend(multiple_choice(model, tokenizer, name, limit, batch_size, progress))
    return rows


def save_results(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as a JSON list (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
