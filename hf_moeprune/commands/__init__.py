"""Subcommands shared by `hf-moeprune` and `optimum-cli moeprune`.

Each subcommand is a module here defining `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`, and
optionally a longer `DESCRIPTION` for its own `--help`.
Module-level imports stay light (argparse only) so `--help` is instant; heavy imports live in `run`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

COMMAND_MODULES = ("inspect", "prune", "merge", "finetune", "run", "eval", "push", "bench", "methods")


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks; an option's help ends with its default when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        no_default = action.default is None or action.default is False or action.default == []
        if no_default or action.default == argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str) -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog=prog, description="Prune and merge the experts of MoE models.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in load_commands():
        description = getattr(module, "DESCRIPTION", module.HELP)
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=description, formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser
