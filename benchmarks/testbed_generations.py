"""Compare two testbed generations on the same held-out documents, whatever their tokenizers.

Token perplexity only compares models that share a tokenizer, so each model is scored in bits per UTF-8 byte of
text, and the newer model's figure is also expressed as the perplexity it would have per token of the older
tokenizer (`exp(its total NLL / the older tokens)`), the number to set beside the older model's token
perplexity. The older testbeds live in git history; extract them first, e.g.

    git archive fa8f1cd hf_moeprune/testbed/checkpoints | tar -x -C /tmp/v1
    python benchmarks/testbed_generations.py --old /tmp/v1/hf_moeprune/testbed/checkpoints/mixtral-8e \
        --new hf_moeprune/testbed/checkpoints/mixtral-8e --domains bbc shakespeare
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from hf_moeprune.evaluate import perplexity
from hf_moeprune.testbed import DOMAINS, heldout_documents
from hf_moeprune.testbed.report import load_testbed


def score(folder: str, documents) -> dict:
    """Per-domain perplexity summaries (with tokens and bits per byte) of a testbed."""
    model, tokenizer = load_testbed(folder)
    return perplexity(model, tokenizer, documents, progress=False)["domains"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="The older testbed folder.")
    parser.add_argument("--new", required=True, help="The newer testbed folder.")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="Also write the rows here as JSON.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    documents = [d for domain in args.domains for d in heldout_documents(domain)]
    old, new = score(args.old, documents), score(args.new, documents)
    rows = []
    print("| domain | old ppl/token | new ppl per old token | ratio | old bits/byte | new bits/byte |")
    print("|---|---|---|---|---|---|")
    for domain in args.domains:
        a, b = old[domain], new[domain]
        new_per_old_token = math.exp(b["nll_per_token"] * b["tokens"] / a["tokens"])  # same text, old tokens
        rows.append({"domain": domain, "old": a, "new": b, "new_perplexity_per_old_token": new_per_old_token})
        print(f"| {domain} | {a['perplexity']:.1f} | {new_per_old_token:.1f} | {new_per_old_token / a['perplexity']:.2f} "
              f"| {a['bits_per_byte']:.3f} | {b['bits_per_byte']:.3f} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
