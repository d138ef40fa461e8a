"""Sweep: prune one base model to several expert counts, measure quality and speed, plot the trade-off.

    python -m hf_moeprune.bench.sweep --model BASE --experts 6 4 2 --method frequency \
        --calibration calib.txt --eval-text heldout.txt --processes 1 2 --expert-parallel \
        --output-dir sweep/

For each count N it writes `sweep/experts-N/` with `AutoMoEPruneModelForCausalLM(...).prune_experts(
MoEPruneConfig(method=..., experts_per_layer=N))` (kept if already there), computes held-out perplexity, then runs
the benchmark (one torchrun launch per process count and model) over the base and every reduced checkpoint. Output:
`sweep.json` (every benchmark field plus `perplexity` per point), `sweep.png` (latency and expert memory against
perplexity), `bench.png` (latency against experts and processes) and the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

from ..calibration import read_calibration_source
from ..evaluate.text import load_text
from .cli import add_bench_arguments, bench_args_from, spawn_launches, write_json
from .plot import optional_plot, plot_benchmark, plot_sweep
from .report import summary_table
from .runner import text_token_ids


def token_ids(model_path: str, text_file: str | None, vocab_size: int, count: int, seq_len: int, seed: int):
    """`[count, seq_len]` token ids from a text file through the checkpoint's tokenizer, or random ids when no
    file is given (speed-only sweeps and tests; the perplexity of random ids only ranks the models)."""
    if text_file:
        ids = text_token_ids(model_path, text_file)
        usable = (ids.numel() // seq_len) * seq_len
        if usable == 0:
            raise ValueError(f"{text_file} holds fewer than {seq_len} tokens")
        return ids[:usable].view(-1, seq_len)[:count]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, seq_len), generator=generator)


@torch.no_grad()
def random_ids_perplexity(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over rows of token ids: ranks models on random ids when no text is given."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluate_quality(model_path: str, eval_texts: list[str] | None, eval_ids: torch.Tensor, window: int) -> float:
    """Held-out perplexity through the evaluation harness, or on random ids when there is no text."""
    from .expert_parallel import load_pretrained

    model = load_pretrained(model_path, dtype=torch.float32).eval()
    if eval_texts is None:
        return random_ids_perplexity(model, eval_ids)
    from transformers import AutoTokenizer

    from ..evaluate import perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return perplexity(model, tokenizer, eval_texts, window=window, progress=False)["overall"]["perplexity"]


def prune_to(base: str, experts: int, out_dir: str, method: str, calibration, seed: int) -> str:
    """`out_dir/experts-N`, pruned from `base` with the core API (reused when it is already there)."""
    from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig

    target = os.path.join(out_dir, f"experts-{experts}")
    if os.path.isfile(os.path.join(target, "config.json")):
        print(f"[sweep] reusing {target}", file=sys.stderr, flush=True)
        return target
    print(f"[sweep] pruning {base} to {experts} experts per layer with {method}", file=sys.stderr, flush=True)
    model = AutoMoEPruneModelForCausalLM.from_pretrained(base)
    model.prune_experts(
        MoEPruneConfig(method=method, experts_per_layer=experts, seed=seed), calibration=calibration
    )
    model.save_pretrained(target)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_moeprune.bench.sweep", description=__doc__.split("\n\n")[0]
    )
    add_bench_arguments(parser, skip=("compare",))
    parser.add_argument(
        "--experts", type=int, nargs="+", required=True, help="Expert counts per layer to prune to."
    )
    parser.add_argument(
        "--method", default="frequency", help="Registered pruning method (MoEPruneConfig.method)."
    )
    parser.add_argument("--calibration", default=None, help="Calibration .txt (blank-line separated) or .jsonl.")
    parser.add_argument(
        "--calibration-samples", type=int, default=64, help="Random calibration rows without a file."
    )
    parser.add_argument(
        "--eval-text", default=None, help="Held-out .txt or .jsonl scored by hf_moeprune.evaluate (random ids without it)."
    )
    parser.add_argument(
        "--eval-sequences", type=int, default=32, help="Held-out sequences of --seq-len tokens."
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Process counts to launch.")
    parser.add_argument("--output-dir", required=True, help="Where the reduced checkpoints and results go.")
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    namespace.compare = []
    args = bench_args_from(namespace)
    os.makedirs(namespace.output_dir, exist_ok=True)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).get_text_config().vocab_size
    calibration = (
        read_calibration_source(namespace.calibration)[0]  # read (and refused when bad) before any pruning
        if namespace.calibration
        else token_ids(args.model, None, vocab, namespace.calibration_samples, args.seq_len, args.seed + 1)
    )
    reduced = [
        prune_to(args.model, n, namespace.output_dir, namespace.method, calibration, args.seed)
        for n in sorted(set(namespace.experts), reverse=True)
    ]
    eval_texts = load_text(namespace.eval_text)["text"] if namespace.eval_text else None
    eval_ids = token_ids(args.model, None, vocab, namespace.eval_sequences, args.seq_len, args.seed + 2)
    quality = {}
    for path in [args.model, *reduced]:
        quality[path] = evaluate_quality(path, eval_texts, eval_ids, args.seq_len)
        print(f"[sweep] perplexity {path}: {quality[path]:.3f}", file=sys.stderr, flush=True)

    args = dataclasses.replace(args, compare=reduced)
    results = spawn_launches(args, namespace.processes)
    for r in results:
        r["perplexity"] = quality[r["model"]]
    payload = {
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": dataclasses.asdict(args),
        "sweep": {
            "method": namespace.method,
            "experts": namespace.experts,
            "calibration": namespace.calibration or f"{namespace.calibration_samples} random rows",
            "eval_text": namespace.eval_text or f"{namespace.eval_sequences} random rows",
            "perplexity": quality,
        },
        "processes": namespace.processes,
        "results": results,
    }
    output = os.path.join(namespace.output_dir, "sweep.json")
    payload["plot"] = payload["sweep_plot"] = None
    write_json(payload, output)  # before any plotting, so a missing matplotlib loses nothing
    print(summary_table(results))
    print("\nperplexity: " + ", ".join(f"{os.path.basename(k)} {v:.3f}" for k, v in quality.items()))
    payload["plot"] = optional_plot(plot_benchmark, results, os.path.join(namespace.output_dir, "bench.png"))
    if payload["plot"]:
        payload["sweep_plot"] = optional_plot(plot_sweep, results, os.path.join(namespace.output_dir, "sweep.png"))
        write_json(payload, output)
    print(f"wrote {output}" + "".join(f", {payload[k]}" for k in ("plot", "sweep_plot") if payload[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
