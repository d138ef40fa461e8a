"""`evaluate_model`: lm-evaluation-harness on an in-memory model, over the offline task definitions in `tasks/`.

lm-eval does the scoring (`HFLM` log-likelihoods, rolling windows, its metrics and standard errors). What is
added here is what it does not do: token-level perplexity with its standard error and a split by domain and
topic (from lm-eval's logged per-document log-likelihoods), and flat result rows for the CLI and the card.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .perplexity import perplexity_rows, scored_documents
from .text import check_text_source

TASK_DIR = Path(__file__).with_name("tasks")
HELDOUT_TASK = "ppl"
USER_TEXT_TASK = "ppl_data"
EVAL_RESULTS_FILE = "eval_results.json"
LM_EVAL_INSTALL = "pip install 'lm-eval==0.4.13' (or `pip install hf_moeprune[eval]`)"


def task_manager(data: str | os.PathLike | None = None):
    """lm-eval's `TaskManager` over this package's task YAMLs only (indexing lm-eval's own 14,000 tasks takes
    seconds); `data` is the file the `ppl_data` task reads, passed as lm-eval task metadata."""
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"Evaluation runs lm-evaluation-harness: {LM_EVAL_INSTALL}.") from error
    metadata = {"data": str(Path(data).resolve())} if data is not None else None
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)


@cache
def known_tasks() -> list[str]:
    """Every task name `evaluate_model` accepts, "ppl" (held-out perplexity) first; `ppl_data` is chosen by
    `data=` instead."""
    names = sorted(set(task_manager().all_tasks) - {HELDOUT_TASK, USER_TEXT_TASK})
    return [HELDOUT_TASK, *names]


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names, validated and without repeats; raises `ValueError` listing the known tasks for an
    unknown one."""
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    unknown = [t for t in names if t not in known_tasks()]
    if unknown:
        raise ValueError(f"Unknown task(s) {', '.join(unknown)}. Known tasks: {', '.join(known_tasks())}.")
    return names


@contextlib.contextmanager
def quiet(progress: bool) -> Iterator[None]:
    """lm-eval logs every step at INFO and draws a bar per batch with `disable=False` hard-coded: keep its
    warnings, and its bars (and datasets') only when `progress` is on."""
    from tqdm import tqdm

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    draw = tqdm.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        draw(self, *args, **kwargs)

    if not progress:
        tqdm.__init__ = silent
    try:
        yield
    finally:
        tqdm.__init__ = draw
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[Any],
    limit: int | None,
    batch_size: int,
    max_length: int | None = None,
    progress: bool = True,
):
    """`lm_eval.simple_evaluate` on `HFLM(pretrained=model)`; returns lm-eval's results and the `HFLM`.

    `tasks` are task names or loaded lm-eval `Task`s; `max_length` is the window (the model's
    `max_position_embeddings` by default).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    training = model.training  # HFLM switches the model to eval mode; a caller's training mode comes back
    try:
        with quiet(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = simple_evaluate(
                lm,
                tasks=list(tasks),
                limit=limit,
                task_manager=task_manager(),
                log_samples=True,
                # scoring draws no random numbers; leave the caller's global seeds alone
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
    finally:
        model.train(training)
    return results, lm


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for no stderr


def lm_eval_rows(results: dict, task: str) -> list[dict[str, Any]]:
    """One row per metric lm-eval reported for `task` (its "metric,filter" keys), with its stderr."""
    scores, n = results["results"][task], results["n-samples"][task]["effective"]
    rows = []
    for key, value in scores.items():
        metric, _, _filter = key.partition(",")
        if not _filter or metric.endswith("_stderr"):
            continue
        stderr = _number(scores.get(f"{metric}_stderr,{_filter}"))
        rows.append({"task": task, "metric": metric, "value": float(value), "stderr": stderr, "n": n})
    return rows


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str] = (HELDOUT_TASK,),
    limit: int | None = None,
    batch_size: int = 8,
    data: str | os.PathLike | None = None,
    ppl_window: int | None = 256,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score a causal LM with lm-evaluation-harness on the offline tasks (`known_tasks()`) and/or own text.

    Args:
        model: a causal LM in memory (e.g. a pruned `wrapped.model`, or a loaded checkpoint), in eval mode.
        tokenizer: its tokenizer.
        tasks (`Sequence[str]`): names from `known_tasks()`; "ppl" is the testbed's held-out text, "ppl_<domain>"
            ("ppl_bbc", "ppl_python_docs", ...) one domain of it, the rest multiple-choice tasks (acc, acc_norm).
        limit (`int`, *optional*): at most this many documents per task (lm-eval's `limit`).
        batch_size (`int`): sequences per forward pass.
        data (`str` or `os.PathLike`, *optional*): a text file or saved dataset whose perplexity to add as task
            "ppl_data" (see `load_text`).
        ppl_window (`int`, *optional*): tokens per perplexity window (the testbeds were trained on 256); None
            for the model's `max_position_embeddings`.
        progress (`bool`): show lm-eval's progress bars.

    Returns:
        `list[dict]`: rows {"task", "metric", "value", "stderr", "n"}, in the order of `tasks`. Perplexity tasks
        give token-level "perplexity" (also per domain and topic, as "ppl/bbc", "ppl/bbc/sport") and lm-eval's
        "word_perplexity", "byte_perplexity", "bits_per_byte".

    Example:
        >>> rows = evaluate_model(model, tokenizer, tasks=["ppl", "arc_easy"], limit=50)
    """
    names = check_tasks(tasks)
    if data is not None:
        check_text_source(data)
        names.append(USER_TEXT_TASK)
    if not names:
        raise ValueError(f"No task given. Known tasks: {', '.join(known_tasks())}; or give data=FILE.")
    with quiet(progress):
        loaded = task_manager(data).load(names)["tasks"]
    rolling = [loaded[n] for n in names if loaded[n].OUTPUT_TYPE == "loglikelihood_rolling"]
    others = [loaded[n] for n in names if loaded[n] not in rolling]
    by_task: dict[str, list[dict[str, Any]]] = {}
    if others:
        results, _ = run_lm_eval(model, tokenizer, others, limit, batch_size, None, progress)
        by_task.update({task.task_name: lm_eval_rows(results, task.task_name) for task in others})
    if rolling:
        results, lm = run_lm_eval(model, tokenizer, rolling, limit, batch_size, ppl_window, progress)
        for task in rolling:
            documents = scored_documents(results["samples"][task.task_name], lm.tok_encode)
            overall, *split = perplexity_rows(task.task_name, documents)
            by_task[task.task_name] = [overall, *lm_eval_rows(results, task.task_name), *split]
    return [row for name in names for row in by_task[name]]


def save_results(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as a JSON list (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
