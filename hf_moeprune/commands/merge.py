"""`hf-moeprune merge`: merge groups of experts (uncurl, mc-smoe, hc-smoe) and save the result."""

from __future__ import annotations

import argparse

from ._recipe import add_recipe_arguments, run_recipe
from .methods import methods_of_kind

NAME = "merge"
HELP = "Merge experts (uncurl, mc-smoe, hc-smoe) and save a smaller, loadable checkpoint."
DESCRIPTION = (
    "Merge groups of similar experts into one expert each (weights averaged, aligned first where the\n"
    "method does so; router rows combined), then save a checkpoint that loads with transformers.\n\n"
    f"merge methods: {', '.join(methods_of_kind('merge'))}\n"
    "`hf-moeprune methods --kind merge` lists each method's options.\n\n"
    "example:\n"
    "  hf-moeprune merge --model DIR --method hc-smoe --experts-per-layer 4 --calibration data.jsonl --output OUT"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, default_method="uncurl", methods=methods_of_kind("merge"))


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, merge=True)
