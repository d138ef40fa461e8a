"""`hf-moeprune bench`: latency, throughput and memory of checkpoints (the same as `python -m hf_moeprune.bench`)."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = "Measure latency, throughput and peak memory of a checkpoint and its reduced versions."
DESCRIPTION = (
    "Measure prefill and decode latency, throughput, peak memory and the communication share of MoE\n"
    "checkpoints, each model in its own processes; expert-parallel with --expert-parallel --processes 2.\n\n"
    "example:\n"
    "  hf-moeprune bench --model BASE --compare OUT --processes 1 2 --output bench.json"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.cli import add_arguments as add_bench_cli_arguments

    add_bench_cli_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..bench.cli import run as run_bench

    return run_bench(args)
