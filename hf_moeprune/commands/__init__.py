"""Subcommands shared by `hf-moeprune` and `optimum-cli moeprune`.

Each subcommand is a module here defining `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
Module-level imports stay light (argparse only) so `--help` is instant; heavy imports live in `run`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

COMMAND_MODULES = ("inspect", "prune", "merge", "eval", "push", "methods")


def load_commands() -> list[ModuleType]:
    """Import every subcommand module that is present, in a stable order."""
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    return modules


def build_parser(prog: str) -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog=prog, description="Prune and merge the experts of MoE models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in load_commands():
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser
