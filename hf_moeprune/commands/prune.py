"""`hf-moeprune prune`: remove experts (and optionally weights inside them) and save the result."""

from __future__ import annotations

import argparse

from ._recipe import add_recipe_arguments, run_recipe

NAME = "prune"
HELP = "Prune experts (frequency, stun, reap, ...) or weights (wanda, owl) and save a loadable checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, default_method="frequency")


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, merge=False)
