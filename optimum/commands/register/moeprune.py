"""`optimum-cli moeprune ...`: the `hf-moeprune` subcommands, registered with optimum's CLI.

optimum (>= 2.0) imports every module of the `optimum.commands.register` namespace package at start-up and
registers the commands listed in its `REGISTER_COMMANDS`. This file is shipped by the `hf_moeprune`
distribution (there must be no `__init__.py` in `optimum/`, `optimum/commands/` or
`optimum/commands/register/`: they are PEP 420 namespace packages shared with optimum itself).

Imports stay light: optimum's base class and our argparse-only command modules. Each command's `run` imports
torch / transformers only when it actually runs, so `optimum-cli --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

if TYPE_CHECKING:
    from argparse import ArgumentParser


class MoEPruneCommand(BaseOptimumCLICommand):
    """`optimum-cli moeprune <prune|merge|push|eval|inspect> ...`, the same commands and options as `hf-moeprune`."""

    COMMAND = CommandInfo(name="moeprune", help="Prune and merge the experts of Mixture-of-Experts models.")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        # optimum builds every registered command's parser on each start-up; when another command runs (or the
        # root --help, which lists only top-level commands), our subcommands are not needed: skip importing them.
        if len(sys.argv) > 1 and sys.argv[1] != MoEPruneCommand.COMMAND.name:
            return
        # Reuse the very modules behind `hf-moeprune` so both CLIs cannot drift apart.
        from hf_moeprune.commands import HelpFormatter, load_commands

        modules = load_commands()
        subparsers = parser.add_subparsers(
            dest="moeprune_command", metavar="{" + ",".join(m.NAME for m in modules) + "}"
        )
        for module in modules:
            sub = subparsers.add_parser(module.NAME, help=module.HELP, formatter_class=HelpFormatter,
                                        description=getattr(module, "DESCRIPTION", module.HELP))
            module.add_arguments(sub)
            sub.set_defaults(moeprune_run=module.run)

    def run(self) -> None:
        command_run = getattr(self.args, "moeprune_run", None)
        if command_run is None:
            self.parser.print_help()
            sys.exit(1)
        from hf_moeprune.cli import report_error

        try:
            code = int(command_run(self.args) or 0)
        except Exception as error:  # same one-line errors as `hf-moeprune`
            code = report_error(error, prog="optimum-cli moeprune")
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [MoEPruneCommand]
