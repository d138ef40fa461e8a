"""Measure a trained testbed and write `testbed_metrics.json` next to its weights.

    python -m hf_moeprune.testbed.report --model hf_moeprune/testbed/checkpoints/mixtral-8e

Records (all on the bundled held-out documents, never trained on):

- held-out perplexity (and bits per byte) overall, per domain and per domain/topic (window 256, float32);
- a small "slice" perplexity the tests recompute (`SLICE_DOCUMENTS` documents);
- routing specialisation: per layer, the histogram of top-k expert choices for each domain and BBC topic, and
  the Jensen-Shannon divergence (base 2, in [0, 1]) between pairs of them (bbc vs shakespeare, sport vs
  politics, every pair of groups), next to a null figure: the divergence between two random halves of the
  documents of one group, which is what sampling noise alone gives;
- perplexity after removing 25% and 50% of the experts of every layer at random (project `random` method,
  several seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import BBC_TOPICS, DOMAINS, Document, heldout_documents

METRICS_FILE = "testbed_metrics.json"
SLICE_DOCUMENTS = 6
PPL_WINDOW = 256


def load_testbed(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Model (eval mode) and tokenizer of a testbed folder, with plain transformers Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, tokenizer


def slice_documents() -> list[Document]:
    """The fixed small slice of held-out documents whose perplexity the tests recompute."""
    from ..evaluate import heldout_subset

    return heldout_subset(heldout_documents(), SLICE_DOCUMENTS)


@torch.no_grad()
def routing_counts(model, tokenizer, documents: Sequence[Document], window: int = PPL_WINDOW) -> torch.Tensor:
    """Top-k expert choices per document: a tensor [documents, layers, experts] of token counts."""
    top_k = model.config.num_experts_per_tok
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    counts = None
    for index, document in enumerate(documents):
        ids = [start] + tokenizer(document.text, add_special_tokens=False)["input_ids"]
        for begin in range(0, len(ids), window):
            chunk = torch.tensor([ids[begin : begin + window]])
            out = model(input_ids=chunk, output_router_logits=True)
            logits = torch.stack([layer.float() for layer in out.router_logits])  # [layers, tokens, experts]
            if counts is None:
                counts = torch.zeros(len(documents), logits.shape[0], logits.shape[-1])
            chosen = logits.topk(top_k, dim=-1).indices
            counts[index] += torch.nn.functional.one_hot(chosen, logits.shape[-1]).sum(dim=(1, 2)).float()
    return counts


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between histograms along the last dimension."""
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log2(), torch.zeros_like(a)).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def specialisation(counts: torch.Tensor, documents: Sequence[Document], seed: int = 0) -> dict[str, Any]:
    """Routing histograms per group and their divergences (per layer and mean over layers)."""
    groups: dict[str, list[int]] = {}
    for index, document in enumerate(documents):
        groups.setdefault(document.domain, []).append(index)
        if document.domain == "bbc":
            groups.setdefault(f"bbc/{document.topic}", []).append(index)
    histograms = {name: counts[idx].sum(0) for name, idx in groups.items()}  # [layers, experts]

    def pair(a: str, b: str) -> dict[str, Any]:
        per_layer = js_divergence(histograms[a], histograms[b])
        return {
            "mean": round(float(per_layer.mean()), 4),
            "per_layer": [round(float(v), 4) for v in per_layer],
        }

    rng = random.Random(seed)

    def null(name: str) -> dict[str, Any]:
        idx = list(groups[name])
        rng.shuffle(idx)
        half = len(idx) // 2
        per_layer = js_divergence(counts[idx[:half]].sum(0), counts[idx[half:]].sum(0))
        return {
            "mean": round(float(per_layer.mean()), 4),
            "per_layer": [round(float(v), 4) for v in per_layer],
        }

    names = sorted(histograms)
    usage = {
        name: [[round(float(v), 4) for v in row / row.sum()] for row in histograms[name]] for name in names
    }
    overall = counts.sum(0)
    share = overall / overall.sum(-1, keepdim=True)
    entropy = -(share * share.clamp_min(1e-12).log2()).sum(-1) / math.log2(share.shape[-1])
    return {
        "js_bits": {
            "bbc_vs_shakespeare": pair("bbc", "shakespeare"),
            "sport_vs_politics": pair("bbc/sport", "bbc/politics"),
            "pairwise_mean": {
                f"{a}|{b}": pair(a, b)["mean"] for i, a in enumerate(names) for b in names[i + 1 :]
            },
        },
        "js_bits_null_random_halves": {
            name: null(name) for name in ("bbc", "shakespeare", "bbc/sport", "bbc/politics")
        },
        "documents_per_group": {name: len(groups[name]) for name in names},
        "usage_per_group": usage,
        "normalised_usage_entropy_per_layer": [round(float(v), 4) for v in entropy],
        "min_expert_share_per_layer": [round(float(v), 4) for v in share.min(-1).values],
    }


def random_removal(
    model, tokenizer, documents, fractions=(0.25, 0.5), seeds=(0, 1, 2), batch_size=8
) -> list[dict]:
    """Held-out perplexity after removing a fraction of every layer's experts at random (several seeds)."""
    from .. import AutoMoEPruneModelForCausalLM, MoEPruneConfig
    from ..evaluate import perplexity

    experts = model.config.num_local_experts
    rows = []
    for fraction in fractions:
        keep = experts - round(experts * fraction)
        values = []
        for seed in seeds:
            pruned = AutoMoEPruneModelForCausalLM.from_model(copy.deepcopy(model), tokenizer)
            pruned.prune_experts(MoEPruneConfig(method="random", experts_per_layer=keep, seed=seed))
            result = perplexity(pruned.model, tokenizer, documents, PPL_WINDOW, batch_size, progress=False)
            values.append(result["overall"]["perplexity"])
            print(f"removed {fraction:.0%} (keep {keep}) seed {seed}: ppl {values[-1]:.2f}", flush=True)
        rows.append(
            {
                "fraction_removed": fraction,
                "experts_kept": keep,
                "seeds": list(seeds),
                "perplexity_per_seed": [round(v, 3) for v in values],
                "perplexity_mean": round(sum(values) / len(values), 3),
            }
        )
    return rows


def measure(
    folder: str | Path,
    batch_size: int = 8,
    removal_documents: int | None = None,
    seeds=(0, 1, 2),
    fractions=(0.25, 0.5),
) -> dict:
    from ..evaluate import heldout_subset, perplexity

    folder = Path(folder)
    model, tokenizer = load_testbed(folder)
    documents = heldout_documents()
    start = time.time()
    full = perplexity(model, tokenizer, documents, PPL_WINDOW, batch_size, progress=False)
    print("held-out perplexity", json.dumps(full["overall"]), json.dumps(full["domains"]), flush=True)
    sliced = perplexity(model, tokenizer, slice_documents(), PPL_WINDOW, batch_size, progress=False)
    counts = routing_counts(model, tokenizer, documents)
    routing = specialisation(counts, documents)
    print(
        "routing",
        json.dumps(routing["js_bits"]["bbc_vs_shakespeare"]),
        json.dumps(routing["js_bits"]["sport_vs_politics"]),
    )
    subset = heldout_subset(documents, removal_documents)
    base_subset = (
        full
        if removal_documents is None
        else perplexity(model, tokenizer, subset, PPL_WINDOW, batch_size, progress=False)
    )
    removal = random_removal(model, tokenizer, subset, fractions, seeds, batch_size)
    metrics = {
        "model": folder.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_local_experts": model.config.num_local_experts,
        "num_experts_per_tok": model.config.num_experts_per_tok,
        "heldout_perplexity": {
            "window": PPL_WINDOW,
            "dtype": "float32",
            "overall": full["overall"],
            "domains": full["domains"],
            "topics": full["topics"],
        },
        "slice_perplexity": {
            "documents": [d.name for d in slice_documents()],
            "window": PPL_WINDOW,
            "dtype": "float32",
            "perplexity": sliced["overall"]["perplexity"],
        },
        "routing": routing,
        "random_expert_removal": {
            "documents": len(subset),
            "baseline_perplexity": base_subset["overall"]["perplexity"],
            "results": removal,
        },
        "seconds": round(time.time() - start, 1),
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def render_markdown(folders: Sequence[str | Path]) -> str:
    """A Markdown table of the recorded training and metrics of testbed folders."""
    entries = []
    for folder in map(Path, folders):
        training = json.loads((folder / "training_report.json").read_text())
        metrics = json.loads((folder / METRICS_FILE).read_text())
        entries.append((folder.name, training, metrics))
    lines = ["| | " + " | ".join(name for name, _, _ in entries) + " |", "|---|" + "---|" * len(entries)]

    def add(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    def ppl(summary: dict) -> str:
        return f"{summary['perplexity']:.2f} ± {summary['stderr']:.2f}"

    add("parameters", [f"{m['parameters'] / 1e6:.2f}M" for _, _, m in entries])
    add(
        "experts (top-k)",
        [f"{m['num_local_experts']} (top-{m['num_experts_per_tok']})" for _, _, m in entries],
    )
    add("training tokens", [f"{t['training_tokens']:,}" for _, t, _ in entries])
    add("training time", [f"{t['seconds'] / 60:.1f} min ({t['threads']} thread)" for _, t, _ in entries])
    add(
        "final training LM loss",
        [f"{[v for k, v in t.items() if k.startswith('final_lm_loss')][0]:.3f}" for _, t, _ in entries],
    )
    add("held-out ppl, all", [ppl(m["heldout_perplexity"]["overall"]) for _, _, m in entries])
    add(
        "held-out bits per byte, all",
        [f"{m['heldout_perplexity']['overall']['bits_per_byte']:.3f}" for _, _, m in entries],
    )
    for domain in DOMAINS:
        add(
            f"held-out ppl, {domain}",
            [ppl(m["heldout_perplexity"]["domains"][domain]) for _, _, m in entries],
        )
    for topic in BBC_TOPICS:
        add(
            f"held-out ppl, bbc/{topic}",
            [ppl(m["heldout_perplexity"]["topics"][f"bbc/{topic}"]) for _, _, m in entries],
        )
    add(
        "held-out tokens (documents)",
        [
            f"{m['heldout_perplexity']['overall']['tokens']:,} ({m['heldout_perplexity']['overall']['documents']})"
            for _, _, m in entries
        ],
    )

    def js(m: dict, key: str) -> str:
        return f"{m['routing']['js_bits'][key]['mean']:.3f} (layers {', '.join(f'{v:.2f}' for v in m['routing']['js_bits'][key]['per_layer'])})"

    add("routing JS bits, bbc vs shakespeare", [js(m, "bbc_vs_shakespeare") for _, _, m in entries])
    add("routing JS bits, sport vs politics", [js(m, "sport_vs_politics") for _, _, m in entries])
    add(
        "routing JS bits, noise floor (max over random halves)",
        [
            f"{max(v['mean'] for v in m['routing']['js_bits_null_random_halves'].values()):.4f}"
            for _, _, m in entries
        ],
    )
    add(
        "normalised usage entropy per layer",
        [
            ", ".join(f"{v:.3f}" for v in m["routing"]["normalised_usage_entropy_per_layer"])
            for _, _, m in entries
        ],
    )
    add(
        "smallest expert share of held-out tokens, per layer",
        [", ".join(f"{v:.2%}" for v in m["routing"]["min_expert_share_per_layer"]) for _, _, m in entries],
    )
    add(
        "ppl on removal set, all experts",
        [f"{m['random_expert_removal']['baseline_perplexity']:.2f}" for _, _, m in entries],
    )
    for index, label in ((0, "25%"), (1, "50%")):
        add(
            f"ppl, {label} experts removed at random",
            [
                (
                    lambda r: (
                        f"{r['perplexity_mean']:.2f} (keep {r['experts_kept']}; seeds: "
                        + ", ".join(f"{v:.1f}" for v in r["perplexity_per_seed"])
                        + ")"
                    )
                )(m["random_expert_removal"]["results"][index])
                for _, _, m in entries
            ],
        )
    return "\n".join(lines) + "\n"


def render_gap(smaller: str | Path, larger: str | Path) -> str:
    """A Markdown table of held-out perplexity per domain of two testbeds (e.g. 8e and 32e) and the larger
    one's change relative to the smaller (negative = better)."""
    metrics = [json.loads((Path(f) / METRICS_FILE).read_text())["heldout_perplexity"] for f in (smaller, larger)]
    names = [Path(f).name for f in (smaller, larger)]
    lines = [f"| domain | {names[0]} | {names[1]} | change |", "|---|---|---|---|"]
    for domain in ("overall", *DOMAINS):
        a, b = (m["overall"] if domain == "overall" else m["domains"][domain] for m in metrics)
        change = b["perplexity"] / a["perplexity"] - 1
        lines.append(f"| {domain} | {a['perplexity']:.2f} | {b['perplexity']:.2f} | {change:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Testbed folder to measure.")
    parser.add_argument(
        "--markdown", nargs="+", help="Print the Markdown table of these measured folders instead."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--removal-documents", type=int, default=None, help="Held-out documents for the removal study."
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.25,0.5", help="Fractions of experts removed at random.")
    args = parser.parse_args(argv)
    if args.markdown:
        print(render_markdown(args.markdown))
        if len(args.markdown) == 2:
            print(render_gap(*args.markdown))
        return
    if not args.model:
        parser.error("--model or --markdown is required")
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    fractions = tuple(float(f) for f in args.fractions.split(","))
    metrics = measure(args.model, args.batch_size, args.removal_documents, seeds, fractions)
    print(json.dumps({k: v for k, v in metrics.items() if k != "routing"}, indent=2))


if __name__ == "__main__":
    main()
