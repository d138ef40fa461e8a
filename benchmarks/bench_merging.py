"""Task-specific expert reduction on the trained testbeds: UNCURL vs MC-SMoE vs HC-SMoE vs REAP, frequency and
random pruning, with and without the same short recovery fine-tune, and the 32-expert testbed reduced to 8 vs the
8-expert testbed trained from scratch (UNCURL's table in miniature).

For each calibration domain and each reduction ratio, every method reduces a fresh copy of the 32-expert testbed
using calibration text of that domain only; held-out perplexity is then measured on every domain. With
`--finetune-steps N`, each reduced model (and the 8e and 32e references) is also fine-tuned for N steps on the
same domain's calibration text with `hf_moeprune.finetune` (language-model loss only, so the 8e model, which has
no base to distil from, gets exactly the same recipe) and measured again. Wall time and peak extra memory (RSS
above the level before the method ran, sampled every 5 ms) of each reduction are reported.

    python benchmarks/bench_merging.py --finetune-steps 30 --output benchmarks/results/merging.md
    python benchmarks/bench_merging.py --random-model --ratios 2 --eval-tokens 2048   # smoke run, no testbed
    python benchmarks/bench_merging.py --from-json a.json b.json --output benchmarks/results/merging.md

Writes the Markdown table, the raw rows (.json) and a plot of quality vs experts kept (.png, needs matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import prepare_calibration
from hf_moeprune.testbed import DOMAINS, calibration_documents, heldout_documents

METHODS = {
    "uncurl": ("merge", {}),
    "uncurl (anchor router rows)": ("merge", {"router_rows": "anchor"}),
    "uncurl (no alignment)": ("merge", {"alignment": "none"}),
    "uncurl (adaptive)": ("merge", {}),
    "mc-smoe": ("merge", {}),
    "hc-smoe": ("merge", {}),
    "reap": ("prune", {}),
    "frequency": ("prune", {}),
    "random": ("prune", {}),
}
DEFAULT_METHODS = ("uncurl", "mc-smoe", "hc-smoe", "reap", "frequency", "random")
ABLATIONS = ("uncurl (anchor router rows)", "uncurl (no alignment)")
DEFAULT_CALIBRATIONS = ("bbc", "shakespeare", "python_docs")
REFERENCES = ("unreduced 32e", "8e from scratch")


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8], help="Expert reduction factors.")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--calibrations", nargs="+", default=list(DEFAULT_CALIBRATIONS), choices=list(DOMAINS),
                        help="Domains whose calibration split each reduction (and fine-tune) uses, one at a time.")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="Held-out tokens per evaluation domain.")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="Also fine-tune every model this many steps on the calibration domain (0: no).")
    parser.add_argument("--finetune-batch-size", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-model", action="store_true", help="Random tiny Mixtral instead of the testbeds.")
    parser.add_argument("--output", help="Write the Markdown report here, the rows beside it (.json) and the plot (.png).")
    parser.add_argument("--ablation-ratios", type=int, nargs="+", default=[4],
                        help="Ratios at which the uncurl ablations run.")
    parser.add_argument("--checkpoint-dir", help="Folder holding mixtral-8e/ and mixtral-32e/ (default: shipped).")
    parser.add_argument("--from-json", nargs="+", help="Only render the rows of earlier runs' .json files together.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = argv if argv is not None else sys.argv[1:]
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(Path(path).read_text())]
    else:
        torch.set_num_threads(args.threads)
        rows = measure(args)
    report = render(rows, args, command)
    print(report)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)
        if not args.from_json:
            output.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        plot(rows, output.with_suffix(".png"))


def measure(args) -> list[dict]:
    from hf_moeprune.evaluate import heldout_subset, perplexity

    big = load("mixtral-32e", args.random_model, args.checkpoint_dir)
    small = load("mixtral-8e", args.random_model, args.checkpoint_dir)
    tokenizer = big.tokenizer
    evals = [
        document
        for domain in DOMAINS
        for document in documents_within(tokenizer, heldout_subset(heldout_documents(domain), None), args.eval_tokens)
    ]

    def evaluate(model) -> dict[str, float]:
        result = perplexity(model.model, tokenizer, evals, window=args.seq_len, progress=False)
        return {domain: round(summary["perplexity"], 3) for domain, summary in result["domains"].items()}

    def finetuned(model, texts: list[str], folder: Path, name: str):
        from hf_moeprune.finetuning import FinetuneArgs, finetune

        options = FinetuneArgs(max_steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                               learning_rate=args.finetune_lr, seq_len=args.seq_len, alpha=0.0,
                               save_steps=10**6, logging_steps=10**6)
        return finetune(copy.deepcopy(model), texts, folder / name, options, teacher=None, progress=False,
                        description=name)

    rows: list[dict] = []

    def with_finetune(row: dict, model, texts: list[str], folder: Path) -> dict:
        """The row, with the model's scores after the fine-tune added when one is asked for."""
        if args.finetune_steps:
            name = f"{row['method']}-{row['experts']}".replace(" ", "_")
            row["finetuned"] = evaluate(finetuned(model, texts, folder, name))
        return row

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    total_experts = big.moe_layers()[0].num_experts
    references = {"unreduced 32e": (big, total_experts), "8e from scratch": (small, small.moe_layers()[0].num_experts)}
    base_scores = {name: evaluate(model) for name, (model, _) in references.items()}
    with tempfile.TemporaryDirectory() as scratch:
        for calibration in args.calibrations:
            texts = [d.text for d in calibration_documents(calibration)]
            data = prepare_calibration(
                token_blocks(tokenizer, texts, args.seq_len, args.calibration_tokens),
                seq_len=args.seq_len, max_sequences=None, description=f"testbed calibration split: {calibration}",
            )
            folder = Path(scratch) / calibration

            for name, (model, experts) in references.items():
                record(with_finetune({"calibration": calibration, "method": name, "experts": experts,
                                      "ppl": base_scores[name]}, model, texts, folder))
            for ratio in args.ratios:
                target = total_experts // ratio
                for label in args.methods:
                    if label in ABLATIONS and ratio not in args.ablation_ratios:
                        continue
                    kind, options = METHODS[label]
                    model = copy.deepcopy(big)
                    if "adaptive" in label:
                        target_kwargs = {"num_experts_total": target * len(big.moe_layers()), "adaptive": True}
                    else:
                        target_kwargs = {"experts_per_layer": target}
                    config = MoEPruneConfig(method=label.split(" ")[0], method_options=options, seed=0, **target_kwargs)
                    with PeakMemory() as memory:
                        start = time.perf_counter()
                        (model.merge_experts if kind == "merge" else model.prune_experts)(config, calibration=data)
                        seconds = time.perf_counter() - start
                    row = {"calibration": calibration, "method": label, "experts": target, "ppl": evaluate(model),
                           "counts": [layer.num_experts for layer in model.moe_layers()],
                           "seconds": round(seconds, 2), "peak_mb": round(memory.extra_mb, 1)}
                    record(with_finetune(row, model, texts, folder))
                    del model
    return rows


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def in_and_out_of_domain(scores: dict[str, float], domain: str) -> tuple[float, float]:
    """Perplexity on the calibration domain and the geometric mean over the other domains."""
    return scores[domain], geometric_mean(v for d, v in scores.items() if d != domain)


def render(rows, args, argv) -> str:
    has_ft = any("finetuned" in r for r in rows)
    finetune_note = (
        f" `+ft`: after {args.finetune_steps} steps of `hf_moeprune.finetune` on the calibration domain "
        f"(batch {args.finetune_batch_size} x {args.seq_len}, learning rate {args.finetune_lr}, LM loss only)."
        if has_ft else ""
    )
    lines = [
        "Command: `python benchmarks/bench_merging.py " + " ".join(argv) + "`",
        "",
        "Held-out token perplexity (`hf_moeprune.evaluate.perplexity`, lm-eval's rolling log-likelihood, windows of "
        f"{args.seq_len}) on about {args.eval_tokens} tokens of every domain: `in` is the calibration domain, "
        "`out` the geometric mean over the other domains. Calibration: "
        f"{args.calibration_tokens} tokens of one domain; {args.threads} CPU threads"
        + (" ; RANDOM tiny model (smoke run)" if args.random_model else "")
        + ". `s` is the reduction's wall time (calibration pass included), `MB` its peak extra RSS." + finetune_note,
    ]
    for calibration in dict.fromkeys(r["calibration"] for r in rows):
        lines += ["", f"### Calibrated on {calibration}", ""]
        head = "| method | experts/layer | ppl in | ppl out |" + (" +ft in | +ft out |" if has_ft else "") + " s | MB |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if r["calibration"] != calibration:
                continue
            cells = [f"{v:.2f}" for v in in_and_out_of_domain(r["ppl"], calibration)]
            if has_ft:
                cells += [f"{v:.2f}" for v in in_and_out_of_domain(r["finetuned"], calibration)] if "finetuned" in r else ["", ""]
            counts = r.get("counts")
            experts = "/".join(map(str, counts)) if counts and len(set(counts)) > 1 else r["experts"]
            lines.append(f"| {r['method']} | {experts} | " + " | ".join(cells)
                         + f" | {r.get('seconds', '')} | {r.get('peak_mb', '')} |")
    lines += ["", "### Every domain (each method's score averaged over the calibration domains, geometric mean)", ""]
    lines += per_domain_table(rows)
    return "\n".join(lines) + "\n"


def per_domain_table(rows) -> list[str]:
    """Perplexity per evaluation domain, each method's rows averaged (geometric mean) over the calibrations."""
    domains = list(rows[0]["ppl"])
    groups: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["experts"], ""), []).append(r["ppl"])
        if "finetuned" in r:
            groups.setdefault((r["method"], r["experts"], " +ft"), []).append(r["finetuned"])
    lines = ["| method | experts/layer | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for (method, experts, suffix), scores in groups.items():
        cells = [f"{geometric_mean(s[d] for s in scores):.2f}" for d in domains]
        lines.append(f"| {method}{suffix} | {experts} | " + " | ".join(cells) + " |")
    return lines


def plot(rows, path: Path) -> None:
    """Quality vs experts kept: in-domain perplexity (geometric mean over calibration domains) per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf_moeprune[bench]'): no plot written", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(9, 4.8))
    for key, style in (("ppl", "-"), ("finetuned", "--")):
        curves: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            if key in r and r["method"] not in REFERENCES:
                curves.setdefault(r["method"], {}).setdefault(r["experts"], []).append(r[key][r["calibration"]])
        for index, (method, points) in enumerate(curves.items()):
            xs = sorted(points)
            axis.plot(xs, [geometric_mean(points[x]) for x in xs], style, marker="o", color=f"C{index}",
                      label=method + (" +ft" if key == "finetuned" else ""))
        for marker, reference in zip(("*", "s"), REFERENCES, strict=True):
            values = [r[key][r["calibration"]] for r in rows if r["method"] == reference and key in r]
            experts = [r["experts"] for r in rows if r["method"] == reference]
            if values:
                axis.scatter([experts[0]], [geometric_mean(values)], marker=marker, s=90, color="black" if key == "ppl" else "grey",
                             label=reference + (" +ft" if key == "finetuned" else ""), zorder=3)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("experts kept per layer (of the 32-expert testbed)")
    axis.set_ylabel("in-domain held-out perplexity")
    axis.set_title("Task-specific expert reduction (geometric mean over calibration domains; dashed: +fine-tune)",
                   fontsize=9)
    axis.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
