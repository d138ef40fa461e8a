"""`hf-moeprune inspect`: per-layer expert counts, top-k, parameters and bytes, without reading weights."""

from __future__ import annotations

import argparse
import json
from typing import Any

NAME = "inspect"
HELP = "Show per-layer expert counts, top-k, parameters and bytes before/after (reads no weights)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Checkpoint folder or Hub id.")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")


def describe(model_path: str) -> dict[str, Any]:
    """The checkpoint's record, or for an unreduced model one built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig

    from ..families import family_for_model_type
    from ..modeling import MoEPruneModel, model_class_for_config

    config = AutoConfig.from_pretrained(model_path)
    model_class = model_class_for_config(config, family_for_model_type(config.model_type).task)
    with torch.device("meta"):
        model = model_class._from_config(config)
    wrapped = MoEPruneModel(model)
    record = wrapped.record
    record.setdefault("base_model", model_path)
    return record


def print_table(record: dict[str, Any]) -> None:
    print(f"family: {record['family']}   base model: {record.get('base_model') or '-'}   uniform: {record['uniform']}")
    for step in record.get("steps", []):
        print(f"step: {step['method']}  forward passes: {step.get('forward_passes', 0)}")
    print(f"{'layer':40s} {'experts':>8s} {'original':>8s} {'top-k':>6s}  merged groups")
    for path, entry in record["layers"].items():
        merged = [g for g in entry["groups"] if len(g) > 1]
        print(f"{path:40s} {entry['num_experts']:>8d} {entry['original_num_experts']:>8d} {entry['top_k']:>6d}  {merged or ''}")
    params, nbytes = record["parameters"], record["bytes"]
    print(f"parameters: {params['before']:,} -> {params['after']:,}   bytes: {nbytes['before']:,} -> {nbytes['after']:,}")
    if record.get("weight_sparsity"):
        values = list(record["weight_sparsity"].values())
        print(f"weight sparsity: mean {sum(values) / len(values):.3f} over {len(values)} modules")


def run(args: argparse.Namespace) -> int:
    record = describe(args.model)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print_table(record)
    return 0
