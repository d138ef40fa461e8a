"""The CLI describes itself without loading torch: --help, --version and `methods`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hf_moeprune import __version__
from hf_moeprune.cli import main
from hf_moeprune.commands import load_commands
from hf_moeprune.commands.methods import METHOD_KINDS
from hf_moeprune.methods import registered_methods


@pytest.mark.parametrize("command", [m.NAME for m in load_commands()])
def test_subcommand_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"hf-moeprune {command}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0] for line in lines[1:] if line and not line.startswith(" ")}
    assert set(registered_methods()) <= listed


def test_static_method_table_matches_registry():
    # prune/merge --help read this table instead of the registry (which imports torch)
    assert METHOD_KINDS == {name: cls.kind for name, cls in registered_methods().items()}


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom hf_moeprune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip().splitlines()[-1] == "False False"


def test_prune_and_merge_help_differ_and_list_their_own_methods(capsys):
    texts = {}
    for command in ("prune", "merge"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = capsys.readouterr().out
    assert texts["prune"] != texts["merge"]
    for command, kinds in (("prune", ("prune", "unstructured")), ("merge", ("merge",))):
        for name, kind in METHOD_KINDS.items():
            description = texts[command].split("\n\n", 1)[1].split("options:")[0]  # after the usage lines
            assert (name in description) == (kind in kinds), (command, name)
    for option, default in (("--seq-len", "256"), ("--batch-size", "8"), ("--max-sequences", "128"),
                            ("--seed", "0")):
        entry = texts["prune"].split(option, 2)[2].split("\n  --")[0]  # the option's own entry, not the usage
        assert f"(default: {default})" in " ".join(entry.split()), option


def test_no_progress_turns_the_calibration_bar_off(capsys):
    import torch
    from conftest import build_tiny_model

    from hf_moeprune import progress
    from hf_moeprune.calibration import run_calibration

    model, batches = build_tiny_model("mixtral"), [torch.ones(1, 4, dtype=torch.long)]
    progress.enable_progress_bars()  # the switch is process-wide: start from the default
    run_calibration(model, batches)
    assert "calibration" in capsys.readouterr().err
    try:
        progress.disable_progress_bars()
        run_calibration(model, batches)
        assert "calibration" not in capsys.readouterr().err
    finally:
        progress.enable_progress_bars()
