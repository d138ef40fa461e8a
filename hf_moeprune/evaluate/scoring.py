"""Batched log-likelihood scoring of causal LMs: continuations given contexts, and rolling perplexity.

`loglikelihoods` follows lm-evaluation-harness (`HFLM._encode_pair` and `_loglikelihood_tokens`): trailing
spaces of the context move to the continuation, the continuation's tokens are the tokens of
`context + continuation` after those of `context`, an empty context is replaced by the BOS/EOS token, and the
input is cut from the left to the model's window. Requests are sorted by length (longest first) and padded on
the right, so causal attention never sees the padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _start_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("The tokenizer has neither a BOS nor an EOS token to start a sequence with.")
    return token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of `context` and `continuation` as lm-evaluation-harness makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    if not context:
        return [_start_token(tokenizer)], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def model_window(model, default: int = 2048) -> int:
    """Longest input the model takes: `max_position_embeddings` (or `default` when the config lacks it)."""
    return int(getattr(model.config, "max_position_embeddings", None) or default)


@torch.no_grad()
def _score_batches(
    model,
    sequences: Sequence[tuple[list[int], int]],
    batch_size: int,
    pad_id: int,
    desc: str,
    progress: bool,
) -> list[tuple[float, bool]]:
    """For each (input ids + target ids, number of targets at the end): summed log-prob of the last targets
    and whether they are the greedy ones. Inputs are `ids[:-1]`, targets `ids[1:]`."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in _progress(batches, len(batches), desc, progress):
        width = max(len(sequences[i][0]) for i in batch) - 1
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = sequences[index][0]
            input_ids[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            attention[row, : len(ids) - 1] = 1
        logits = (
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
        )
        logprobs = F.log_softmax(logits, dim=-1)
        for row, index in enumerate(batch):
            ids, n_targets = sequences[index]
            end = len(ids) - 1
            targets = torch.tensor(ids[end - n_targets + 1 : end + 1])
            rows = logprobs[row, end - n_targets : end]
            total = float(rows.gather(1, targets[:, None]).sum())
            greedy = bool((rows.argmax(-1) == targets).all())
            results[index] = (total, greedy)
    return results


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Log-likelihood of each `continuation` given its `context`, as lm-evaluation-harness computes it.

    Args:
        model: a causal LM returning `.logits`.
        tokenizer: its tokenizer.
        requests (`Sequence[tuple[str, str]]`): (context, continuation) pairs.
        batch_size (`int`): sequences per forward pass.
        max_length (`int`, *optional*): longest input; defaults to the model's `max_position_embeddings`.
        progress (`bool`): show a progress bar.

    Returns:
        `list[tuple[float, bool]]`: per request, the summed log-probability of the continuation's tokens and
        whether every one of them is the model's greedy choice.
    """
    max_length = max_length or model_window(model)
    sequences = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f"Empty continuation after tokenization: {continuation!r}")
        ids = (context_ids + continuation_ids)[-(max_length + 1) :]
        sequences.append((ids, len(continuation_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _score_batches(model, sequences, batch_size, pad, desc, progress)


@dataclass
class _Total:
    nll: float = 0.0
    tokens: int = 0
    per_document: list[tuple[float, int]] | None = None

    def add(self, nll: float, tokens: int) -> None:
        self.nll += nll
        self.tokens += tokens
        self.per_document = (self.per_document or []) + [(nll, tokens)]

    def summary(self) -> dict[str, Any]:
        documents = self.per_document or []
        mean = self.nll / max(self.tokens, 1)
        # Ratio estimator over documents (delta method): stderr of the token-weighted mean NLL, then of exp().
        stderr_nll = float("nan")
        if len(documents) > 1:
            mean_tokens = self.tokens / len(documents)
            residual = sum((nll - mean * n) ** 2 for nll, n in documents) / (len(documents) - 1)
            stderr_nll = math.sqrt(residual / len(documents)) / mean_tokens
        ppl = math.exp(mean)
        return {
            "perplexity": ppl,
            "nll_per_token": mean,
            "stderr": ppl * stderr_nll,
            "tokens": self.tokens,
            "documents": len(documents),
        }


def _fields(document: Any) -> tuple[str, str, str]:
    if isinstance(document, str):
        return document, "all", "all"
    if isinstance(document, dict):
        return document["text"], document.get("domain", "all"), document.get("topic", "all")
    return document.text, getattr(document, "domain", "all"), getattr(document, "topic", "all")


def perplexity(
    model,
    tokenizer,
    documents: Sequence[Any],
    window: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity of held-out documents, overall, per domain and per domain/topic.

    Each document is scored on its own: its tokens are preceded by the BOS (else EOS) token and cut into
    disjoint windows of `window` tokens; every token is predicted from the earlier tokens of its window.
    Perplexity is `exp(total NLL / total tokens)`; `stderr` is the delta-method standard error treating
    documents as the sampled units.

    Args:
        model: a causal LM returning `.logits`.
        tokenizer: its tokenizer.
        documents: `testbed.Document`s, dicts with "text" (and optionally "domain", "topic"), or strings.
        window (`int`): tokens per forward pass (the testbeds were trained on 256).
        batch_size (`int`): windows per forward pass.

    Returns:
        `dict`: {"overall": summary, "domains": {domain: summary}, "topics": {"domain/topic": summary}}, each
        summary with "perplexity", "nll_per_token", "stderr", "tokens", "documents".
    """
    window = min(window, model_window(model))
    start = _start_token(tokenizer)
    sequences, owners, fields = [], [], []
    for index, document in enumerate(documents):
        text, domain, topic = _fields(document)
        fields.append((domain, topic))
        ids = [start] + _encode(tokenizer, text)
        for begin in range(0, len(ids) - 1, window):
            chunk = ids[begin : begin + window + 1]
            sequences.append((chunk, len(chunk) - 1))
            owners.append(index)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = _score_batches(model, sequences, batch_size, pad, "perplexity", progress)
    per_document = [[0.0, 0] for _ in documents]
    for (logprob, _), (_ids, n), owner in zip(scores, sequences, owners, strict=True):
        per_document[owner][0] -= logprob
        per_document[owner][1] += n
    overall, domains, topics = _Total(), {}, {}
    for (nll, n), (domain, topic) in zip(per_document, fields, strict=True):
        overall.add(nll, n)
        domains.setdefault(domain, _Total()).add(nll, n)
        topics.setdefault(f"{domain}/{topic}", _Total()).add(nll, n)
    return {
        "overall": overall.summary(),
        "domains": {k: v.summary() for k, v in sorted(domains.items())},
        "topics": {k: v.summary() for k, v in sorted(topics.items())},
    }
