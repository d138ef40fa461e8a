"""`optimum-cli moeprune ...`: registered through optimum's namespace, same commands and options as `hf-moeprune`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moeprune.commands import build_parser, load_commands

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")


def _subcommand_parsers(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser) -> list[tuple]:
    return sorted(
        (tuple(a.option_strings) or (a.dest,), a.nargs, a.default, type(a).__name__)
        for a in parser._actions
        if a.dest != "help"
    )


def test_namespace_packages_have_no_init() -> None:
    for folder in ("optimum", "optimum/commands", "optimum/commands/register"):
        assert not (REPO_ROOT / folder / "__init__.py").exists(), (
            f"{folder} must stay a PEP 420 namespace package"
        )


@pytest.mark.skipif(not OPTIMUM_CLI.exists(), reason="optimum-cli is not installed next to this interpreter")
def test_optimum_cli_lists_the_subcommands() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(OPTIMUM_CLI), "moeprune", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    names = [module.NAME for module in load_commands()]
    assert "push" in names
    for name in names:
        assert name in result.stdout


def test_same_commands_and_options_as_hf_moeprune(monkeypatch) -> None:
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import (
        load_optimum_namespace_cli_commands,
        register_optimum_cli_subcommand,
    )

    monkeypatch.setattr(sys, "argv", ["optimum-cli", "moeprune"])
    commands = dict(load_optimum_namespace_cli_commands())
    plugin = next(cls for cls in commands if getattr(cls, "COMMAND", None) and cls.COMMAND.name == "moeprune")
    root = RootOptimumCLICommand("optimum-cli")
    register_optimum_cli_subcommand(plugin, parent_command=root)
    ours = _subcommand_parsers(build_parser("hf-moeprune"))
    theirs = _subcommand_parsers(_subcommand_parsers(root.parser)["moeprune"])
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        assert _options(theirs[name]) == _options(ours[name]), name

    # A parsed `optimum-cli moeprune push ...` runs the very `run` of hf_moeprune.commands.push.
    args = root.parser.parse_args(["moeprune", "push", "out", "me/x", "--private"])
    from hf_moeprune.commands import push

    assert args.moeprune_run is push.run and args.private is True and args.repo_id == "me/x"


def test_other_optimum_commands_do_not_import_hf_moeprune() -> None:
    code = (
        "import sys; sys.argv = ['optimum-cli', 'env'];"
        "from optimum.commands.base import RootOptimumCLICommand;"
        "from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands, register_optimum_cli_subcommand;"
        "root = RootOptimumCLICommand('optimum-cli');"
        "[register_optimum_cli_subcommand(c, parent_command=root) for c, _ in load_optimum_namespace_cli_commands()];"
        "assert 'moeprune' in root.parser.format_help();"
        "assert 'hf_moeprune' not in sys.modules and 'torch' not in sys.modules, 'plugin import is not light'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
