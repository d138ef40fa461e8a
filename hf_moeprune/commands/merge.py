"""`hf-moeprune merge`: merge groups of experts (uncurl, mc-smoe, hc-smoe) and save the result."""

from __future__ import annotations

import argparse

from ._recipe import add_recipe_arguments, run_recipe

NAME = "merge"
HELP = "Merge experts (uncurl, mc-smoe, hc-smoe) and save a smaller, loadable checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, default_method="uncurl")


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, merge=True)
