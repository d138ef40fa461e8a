"""Token-level perplexity from lm-eval's rolling log-likelihoods, overall and split by domain and topic.

lm-eval scores each document as `loglikelihood_rolling` (disjoint windows, the first token predicted from the
BOS, else EOS, token) and reports word and byte perplexity; per-token perplexity, its standard error and a
split by a document's "domain" and "topic" fields are computed here from its logged per-document results.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .tasks.sources import hash_order

# A split with more values than this is left out of the rows: it would swamp the table.
MAX_SPLIT_ROWS = 12


def scored_documents(samples: Sequence[dict], encode: Callable[[str], list[int]]) -> list[dict[str, Any]]:
    """Per document of a rolling task: its fields, negative log-likelihood and token count (`encode` is the
    `HFLM.tok_encode` that made the windows, so every counted token was predicted once)."""
    return [
        {"doc": s["doc"], "nll": -float(s["filtered_resps"][0]), "tokens": len(encode(s["target"]))}
        for s in samples
    ]


def summary(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`exp(total NLL / total tokens)` and its delta-method standard error, documents being the sampled units
    (a ratio estimator: the token-weighted mean NLL, then its exp), and bits per UTF-8 byte of text, which
    compares models whose tokenizers differ."""
    nll = sum(d["nll"] for d in documents)
    tokens = sum(d["tokens"] for d in documents)
    text_bytes = sum(len(str(d["doc"].get("text", "")).encode("utf-8")) for d in documents)
    mean = nll / max(tokens, 1)
    stderr_nll = float("nan")
    if len(documents) > 1:
        mean_tokens = tokens / len(documents)
        residual = sum((d["nll"] - mean * d["tokens"]) ** 2 for d in documents) / (len(documents) - 1)
        stderr_nll = math.sqrt(residual / len(documents)) / mean_tokens
    ppl = math.exp(mean)
    return {
        "perplexity": ppl,
        "nll_per_token": mean,
        "stderr": ppl * stderr_nll,
        "bits_per_byte": nll / math.log(2) / text_bytes if text_bytes else float("nan"),
        "tokens": tokens,
        "documents": len(documents),
    }


def _split(documents: Sequence[dict[str, Any]], field: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        groups.setdefault(str(document["doc"].get(field) or "all"), []).append(document)
    return dict(sorted(groups.items()))


def _row(task: str, documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    s = summary(documents)
    return {
        "task": task,
        "metric": "perplexity",
        "value": s["perplexity"],
        "stderr": s["stderr"],
        "n": s["documents"],
        "tokens": s["tokens"],
    }


def perplexity_rows(task: str, documents: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Token perplexity rows: `task` overall, then per domain ("ppl/bbc") when there are several, and per topic
    of each domain ("ppl/bbc/sport") when a domain has 2 to `MAX_SPLIT_ROWS` topics of 2 documents on average
    (Shakespeare's works, mostly one section each, stay in `perplexity()`'s result)."""
    rows = [_row(task, documents)]
    domains = _split(documents, "domain")
    if len(domains) > 1:
        rows.extend(_row(f"{task}/{domain}", docs) for domain, docs in domains.items())
    for domain, docs in domains.items():
        topics = _split(docs, "topic")
        if 1 < len(topics) <= MAX_SPLIT_ROWS and len(docs) >= 2 * len(topics):
            prefix = f"{task}/{domain}" if len(domains) > 1 else task
            rows.extend(_row(f"{prefix}/{topic}", group) for topic, group in topics.items())
    return rows


def _fields(document: Any) -> dict[str, str]:
    if isinstance(document, str):
        return {"text": document, "domain": "all", "topic": "all"}
    if isinstance(document, dict):
        return {"text": document["text"], "domain": document.get("domain", "all"), "topic": document.get("topic", "all")}
    return {"text": document.text, "domain": getattr(document, "domain", "all"), "topic": getattr(document, "topic", "all")}


def perplexity(
    model,
    tokenizer,
    documents: Sequence[Any],
    window: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity of documents in memory, overall, per domain and per domain/topic, through
    lm-eval's rolling log-likelihood (each document on its own, in disjoint windows of `window` tokens).

    Args:
        model: a causal LM returning `.logits`.
        tokenizer: its tokenizer.
        documents: `testbed.Document`s, dicts with "text" (and optionally "domain", "topic"), or strings.
        window (`int`): tokens per window (the testbeds were trained on 256).
        batch_size (`int`): windows per forward pass.

    Returns:
        `dict`: {"overall": summary, "domains": {domain: summary}, "topics": {"domain/topic": summary}}, each
        summary with "perplexity", "nll_per_token", "stderr", "bits_per_byte", "tokens", "documents" (see
        `summary`).
    """
    from .harness import USER_TEXT_TASK, quiet, run_lm_eval, task_manager

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "documents.jsonl"
        path.write_text("".join(json.dumps(_fields(d)) + "\n" for d in documents), encoding="utf-8")
        with quiet(progress):
            task = task_manager(path).load([USER_TEXT_TASK])["tasks"][USER_TEXT_TASK]
        results, lm = run_lm_eval(model, tokenizer, [task], None, batch_size, window, progress)
    scored = scored_documents(results["samples"][USER_TEXT_TASK], lm.tok_encode)
    topics: dict[str, list[dict[str, Any]]] = {}
    for document in scored:
        topics.setdefault(f"{document['doc']['domain']}/{document['doc']['topic']}", []).append(document)
    return {
        "overall": summary(scored),
        "domains": {k: summary(v) for k, v in _split(scored, "domain").items()},
        "topics": {k: summary(v) for k, v in sorted(topics.items())},
    }


def heldout_subset(documents: Sequence[Any], limit: int | None) -> list[Any]:
    """The first `limit` documents in the order the "ppl" task reads them (by a hash of their name), so a small
    limit still mixes domains and topics; all of them when `limit` is None."""
    return hash_order(list(documents))[:limit] if limit else list(documents)

