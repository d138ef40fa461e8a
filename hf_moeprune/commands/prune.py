"""`hf-moeprune prune`: remove experts (and optionally weights inside them) and save the result."""

from __future__ import annotations

import argparse

from ._recipe import add_recipe_arguments, run_recipe
from .methods import methods_of_kind

NAME = "prune"
HELP = "Prune experts (frequency, stun, reap, ...) or weights (wanda, owl) and save a loadable checkpoint."
DESCRIPTION = (
    "Remove whole experts from every MoE layer (router rows and config counts follow), or zero weights\n"
    "inside them, then save a checkpoint that loads with transformers.\n\n"
    f"expert pruning methods:        {', '.join(methods_of_kind('prune'))}\n"
    f"unstructured (weight) methods: {', '.join(methods_of_kind('unstructured'))}\n"
    "`hf-moeprune methods --kind prune` lists each method's options.\n\n"
    "example:\n"
    "  hf-moeprune prune --model DIR --method reap --experts-per-layer 4 --calibration data.jsonl --output OUT"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, default_method="frequency", methods=methods_of_kind("prune", "unstructured"))


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, merge=False)
