"""The streaming benchmark's measurement: a child's own peak RSS and exit code, with and without GNU time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import streaming_memory
from hf_moeprune.commands import build_parser

ALLOCATE_300_MIB = [sys.executable, "-c", "import sys; block = b'x' * (300 << 20); sys.exit(3)"]


@pytest.fixture(params=[True, False], ids=["usr-bin-time", "getrusage-wrapper"])
def reporter(request, tmp_path, monkeypatch):
    """Measure with GNU time where it is installed, and with the fallback wrapper."""
    if request.param and not streaming_memory.GNU_TIME.is_file():
        pytest.skip("/usr/bin/time is not installed")
    if not request.param:
        monkeypatch.setattr(streaming_memory, "GNU_TIME", Path(tmp_path / "no-time"))


def test_measure_reports_the_childs_peak_rss_and_exit_code(tmp_path, reporter):
    usage = streaming_memory.measure(ALLOCATE_300_MIB, tmp_path / "log.txt")
    assert usage.returncode == 3
    assert 300 << 20 <= usage.peak_rss_bytes < 1 << 30
    assert 0 < usage.cpu_s and 0 < usage.wall_s
    small = streaming_memory.measure([sys.executable, "-c", "pass"], tmp_path / "log.txt")
    assert small.returncode == 0 and small.peak_rss_bytes < 200 << 20  # neither the earlier child's peak nor pytest's


def test_a_killed_child_reads_as_failed(tmp_path, reporter):
    kill_self = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert streaming_memory.measure(kill_self, tmp_path / "log.txt").returncode == 137  # as GNU time and the shell report an out-of-memory kill


@pytest.mark.parametrize("name", sorted(set(streaming_memory.METHODS) - {"cp", "inspect"}))
def test_every_method_is_a_valid_cli_call(tmp_path, name):
    argv = streaming_memory.METHODS[name].argv(tmp_path / "in", tmp_path / "out", 4, ["--seed", "7"])
    assert argv[: len(streaming_memory.CLI)] == streaming_memory.CLI
    args = build_parser("hf-moeprune").parse_args(argv[len(streaming_memory.CLI):])
    assert (args.model, args.output, args.overwrite, args.seed) == (str(tmp_path / "in"), str(tmp_path / "out"), True, 7)
    assert args.experts_per_layer == 4 or args.expert_sparsity == 0.5


def test_reference_commands_get_no_extra_args(tmp_path):
    cp = streaming_memory.METHODS["cp"].argv(tmp_path / "in", tmp_path / "out", 4, ["--streaming"])
    assert cp == ["cp", "-r", str(tmp_path / "in"), str(tmp_path / "out")]
    inspect = streaming_memory.METHODS["inspect"].argv(tmp_path / "in", tmp_path / "out", 4, ["--streaming"])
    args = build_parser("hf-moeprune").parse_args(inspect[len(streaming_memory.CLI):])
    assert args.model == str(tmp_path / "in")


def test_bad_arguments_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        streaming_memory.parse_args(["--methods", "frequency,magic"])
    assert "unknown magic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        streaming_memory.parse_args(["--sizes", "0.5,big"])
    assert "--sizes expects numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        streaming_memory.parse_args(["--sizes", "-1"])
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--extra-args '--no-such-flag'"):
        streaming_memory.check_extra_args(["cp", "stun"], ["--no-such-flag"])
    streaming_memory.check_extra_args(["cp", "stun", "uncurl"], ["--seed", "3"])


def test_disk_check_refuses_before_writing(tmp_path):
    with pytest.raises(SystemExit, match="GiB free"):
        streaming_memory.check_disk(tmp_path, [1e6], ["cp", "stun"], keep=False)
    streaming_memory.check_disk(tmp_path, [0.001], ["cp", "stun"], keep=True)


def test_a_shallow_checkpoint_keeps_the_full_sizes_layers(tmp_path, monkeypatch):
    full = streaming_memory.shape_for_bytes(30e9)
    shallow = streaming_memory.planned_shape(30, layers=2)
    assert shallow.num_hidden_layers == 2 and full.num_hidden_layers > 2
    layer = [shape for name, shape in full.tensor_shapes() if name.startswith("model.layers.0.")]
    assert [shape for name, shape in shallow.tensor_shapes() if name.startswith("model.layers.0.")] == layer
    # the disk check counts the shallow checkpoint (about 2 GB twice), not the 30 GB one
    free = 8e9
    monkeypatch.setattr(streaming_memory.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free}))
    streaming_memory.check_disk(tmp_path, [30], ["cp", "stun"], keep=False, layers=2)
    with pytest.raises(SystemExit, match="GiB free"):
        streaming_memory.check_disk(tmp_path, [30], ["cp", "stun"], keep=False)
    with pytest.raises(SystemExit):
        streaming_memory.parse_args(["--layers", "0"])
