"""Task-specific expert reduction on the trained testbeds: UNCURL vs MC-SMoE vs HC-SMoE vs frequency and random
pruning vs the unreduced model, and the 32-expert testbed reduced to 8 vs the 8-expert testbed from scratch.

For each calibration domain (default: BBC sport, Shakespeare) and each reduction ratio, every method reduces a
fresh copy of the 32-expert testbed using calibration text of that domain only; held-out perplexity is then
measured on that domain and on the others. Wall time and peak extra memory (RSS above the level before the
method ran, sampled every 5 ms) of each reduction are reported.

    python benchmarks/bench_merging.py --output benchmarks/results_merging.md
    python benchmarks/bench_merging.py --random-model --ratios 2 --eval-tokens 2048   # smoke run, no testbed
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import prepare_calibration

METHODS = {
    "uncurl": ("merge", {}),
    "uncurl (anchor router rows)": ("merge", {"router_rows": "anchor"}),
    "uncurl (no alignment)": ("merge", {"alignment": "none"}),
    "uncurl (adaptive)": ("merge", {}),
    "mc-smoe": ("merge", {}),
    "hc-smoe": ("merge", {}),
    "frequency": ("prune", {}),
    "random": ("prune", {}),
}
ABLATIONS = ("uncurl (anchor router rows)", "uncurl (no alignment)")
CALIBRATIONS = {"bbc-sport": ("bbc", "sport"), "shakespeare": ("shakespeare", None)}
EVALUATIONS = {
    "bbc-sport": ("bbc", "sport"),
    "shakespeare": ("shakespeare", None),
    "bbc-other": ("bbc", "other"),
}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Largest RSS above the starting level while the block runs (a 5 ms sampling thread)."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra_mb = (self.peak - self.start) / 2**20


def documents(domain: str, topic: str | None, split: str):
    from hf_moeprune.testbed import calibration_documents, heldout_documents

    source = heldout_documents if split == "heldout" else calibration_documents
    if topic == "other":
        return [d for d in source(domain) if d.topic != "sport"]
    return source(domain, topic)


def token_blocks(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= max_tokens:
            break
    usable = min(len(ids), max_tokens) // seq_len * seq_len
    return torch.tensor(ids[:usable]).view(-1, seq_len)


def documents_within(tokenizer, docs, max_tokens: int):
    """Held-out documents (in the harness's fixed hashed order) until about `max_tokens` tokens."""
    chosen, tokens = [], 0
    for document in docs:
        if tokens >= max_tokens:
            break
        chosen.append(document)
        tokens += len(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    return chosen


def random_model(experts: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.testbed import testbed_path

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(testbed_path("mixtral-8e"))
    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def load(name: str, use_random: bool, checkpoint_dir: str | None = None):
    if use_random:
        model, tokenizer = random_model(32 if name.endswith("32e") else 8)
        return AutoMoEPruneModelForCausalLM.from_model(model, tokenizer)
    from hf_moeprune.testbed import testbed_path

    path = Path(checkpoint_dir) / name if checkpoint_dir else testbed_path(name)
    wrapped = AutoMoEPruneModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    wrapped.model.eval()
    return wrapped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ratios", type=int, nargs="+", default=[2, 4, 8, 16], help="Expert reduction factors."
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=list(CALIBRATIONS))
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument(
        "--eval-tokens", type=int, default=16384, help="Held-out tokens per evaluation domain."
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--random-model", action="store_true", help="Random tiny Mixtral instead of the testbeds."
    )
    parser.add_argument(
        "--output", help="Write the markdown report here (and the raw rows beside it as .json)."
    )
    parser.add_argument(
        "--ablation-ratios",
        type=int,
        nargs="+",
        default=[4],
        help="Ratios at which the uncurl ablations run.",
    )
    parser.add_argument(
        "--checkpoint-dir", help="Folder holding mixtral-8e/ and mixtral-32e/ (default: shipped)."
    )
    parser.add_argument(
        "--from-json", nargs="+", help="Only render the rows of earlier runs' .json files together."
    )
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(Path(path).read_text())]
        report = render(rows, args, argv if argv is not None else sys.argv[1:])
        print(report)
        if args.output:
            Path(args.output).write_text(report)
        return
    torch.set_num_threads(args.threads)

    big = load("mixtral-32e", args.random_model, args.checkpoint_dir)
    small = load("mixtral-8e", args.random_model, args.checkpoint_dir)
    tokenizer = big.tokenizer
    from hf_moeprune.evaluate import heldout_subset, perplexity

    evals = {
        name: documents_within(
            tokenizer, heldout_subset(documents(*where, "heldout"), None), args.eval_tokens
        )
        for name, where in EVALUATIONS.items()
    }
    rows = []

    def evaluate(model):
        scores = {}
        for name, docs in evals.items():
            result = perplexity(model.model, tokenizer, docs, window=args.seq_len, progress=False)["overall"]
            scores[name] = round(result["perplexity"], 3)
            scores[f"{name} stderr"] = round(result["stderr"], 3)
        return scores

    base_ppl = evaluate(big)
    small_ppl = evaluate(small)
    total_experts = big.moe_layers()[0].num_experts
    for calibration in args.calibrations:
        domain, topic = CALIBRATIONS[calibration]
        texts = [d.text for d in documents(domain, topic, "calibration")]
        data = prepare_calibration(
            token_blocks(tokenizer, texts, args.seq_len, args.calibration_tokens),
            seq_len=args.seq_len,
            max_sequences=None,
            description=f"testbed calibration split: {calibration}",
        )
        rows.append(
            {"calibration": calibration, "method": "unreduced 32e", "experts": total_experts, **base_ppl}
        )
        rows.append({"calibration": calibration, "method": "8e from scratch", "experts": 8, **small_ppl})
        for ratio in args.ratios:
            target = total_experts // ratio
            for label in args.methods:
                if label in ABLATIONS and ratio not in args.ablation_ratios:
                    continue
                kind, options = METHODS[label]
                method = label.split(" ")[0]
                model = copy.deepcopy(big)
                if "adaptive" in label:
                    target_kwargs = {"num_experts_total": target * len(big.moe_layers()), "adaptive": True}
                else:
                    target_kwargs = {"experts_per_layer": target}
                config = MoEPruneConfig(method=method, method_options=options, seed=0, **target_kwargs)
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    (model.merge_experts if kind == "merge" else model.prune_experts)(
                        config, calibration=data
                    )
                    seconds = time.perf_counter() - start
                ppl = evaluate(model)
                row = {
                    "calibration": calibration,
                    "method": label,
                    "experts": target,
                    **ppl,
                    "counts": [layer.num_experts for layer in model.moe_layers()],
                    "seconds": round(seconds, 2),
                    "peak_mb": round(memory.extra_mb, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
    report = render(rows, args, argv if argv is not None else sys.argv[1:])
    print(report)
    if args.output:
        Path(args.output).write_text(report)
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows, args, argv) -> str:
    lines = [
        "Command: `python benchmarks/bench_merging.py " + " ".join(argv) + "`",
        "",
        "Held-out perplexity from `hf_moeprune.evaluate.perplexity` (lm-eval's rolling log-likelihood: each document scored on its own in "
        f"windows of {args.seq_len} tokens; about {args.eval_tokens} tokens of held-out documents per domain; "
        "`±` is the across-document standard error, shown for the reference rows: differences between methods "
        "are paired on the same documents and so far more precise than that). Calibration "
        f"{args.calibration_tokens} tokens of one domain; {args.threads} CPU threads"
        + (" ; RANDOM tiny model (smoke run)" if args.random_model else "")
        + ". `s` is the reduction's wall time (calibration pass included), `MB` its peak extra RSS.",
    ]
    for calibration in dict.fromkeys(r["calibration"] for r in rows):
        lines += ["", f"### Calibrated on {calibration}", ""]
        lines += ["| method | experts/layer | " + " | ".join(f"ppl {n}" for n in EVALUATIONS) + " | s | MB |"]
        lines += ["|---|---|" + "---|" * len(EVALUATIONS) + "---|---|"]
        for r in rows:
            if r["calibration"] != calibration:
                continue
            cells = [
                f"{r[n]:.2f}"
                + (f" ± {r[n + ' stderr']:.1f}" if "seconds" not in r and f"{n} stderr" in r else "")
                for n in EVALUATIONS
            ]
            counts = r.get("counts")
            experts = "/".join(map(str, counts)) if counts and len(set(counts)) > 1 else r["experts"]
            lines.append(
                f"| {r['method']} | {experts} | "
                + " | ".join(cells)
                + f" | {r.get('seconds', '')} | {r.get('peak_mb', '')} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
