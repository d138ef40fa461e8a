"""Calibration overhead: time of the statistics pass / time of a plain forward pass over the same batches.

    python benchmarks/bench_calibration_overhead.py [--model DIR] [--batches 4 --batch-size 8 --seq-len 256]

Without --model a Mixtral-like model with the testbed's shape is built from a config (random weights; the
timing does not depend on them). Target: ratio <= 1.3. Prints both times and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_moeprune.calibration import collect_statistics, run_calibration
from hf_moeprune.families import family_for_model_type
from hf_moeprune.moe_layers import find_moe_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        torch.manual_seed(0)
        config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=args.experts,
                               num_experts_per_tok=2)
        model = AutoModelForCausalLM.from_config(config).eval()
    layers = find_moe_layers(model, family_for_model_type(model.config.model_type))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.batches)]
    run_calibration(model, batches[:1], progress=False)  # warm-up
    plain, collected = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_calibration(model, batches, progress=False)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        collect_statistics(model, layers, batches, progress=False)
        collected.append(time.perf_counter() - start)
    plain_s, collected_s = statistics.median(plain), statistics.median(collected)
    tokens = args.batches * args.batch_size * args.seq_len
    name = args.model or f"Mixtral-like, hidden 256, 4 layers, {args.experts} experts"
    print(f"model: {name}; {tokens} tokens, "
          f"{torch.get_num_threads()} threads, experts implementation {model.config._experts_implementation}")
    print(f"plain forward:     {plain_s:.3f} s (median of {args.repeats})")
    print(f"statistics pass:   {collected_s:.3f} s (median of {args.repeats})")
    print(f"overhead ratio:    {collected_s / plain_s:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
