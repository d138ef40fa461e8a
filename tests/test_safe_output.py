"""Saving never destroys data the user did not ask to replace, and a killed save loses nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM
from hf_moeprune.checkpoint import STAGING_TAG

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my results")
    (path / "config.json").write_text('{"model_type": "mixtral"}')  # looks like a model, has no record
    return path


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "base"
    build_tiny_model("mixtral").save_pretrained(folder)
    return folder


# case: (name, setup(tmp) -> (cwd, output), overwrite, words in the message)
CASES = [
    ("non-empty user folder", lambda t: (t, user_folder(t / "out")), False, ["not empty", "--overwrite"]),
    ("overwrite a non-checkpoint", lambda t: (t, user_folder(t / "out")), True, ["not an hf_moeprune checkpoint"]),
    ("current directory", lambda t: (user_folder(t / "work"), Path(".")), True, ["current directory"]),
    ("parent of cwd", lambda t: (user_folder(t / "work" / "sub"), Path("..")), True, ["parent"]),
    ("output is the model", lambda t: (t, t / "base"), True, ["loaded from"]),
    ("model inside output", lambda t: (Path(t.anchor), t), True, ["loaded from"]),
    ("output is a file", lambda t: (t, _file(t / "out.bin")), True, ["is a file"]),
    ("output under a file", lambda t: (t, _file(t / "out.bin") / "child"), False, ["is a file"]),
]


def _file(path: Path) -> Path:
    path.write_bytes(b"user data")
    return path


@pytest.mark.parametrize(("name", "setup", "overwrite", "words"), CASES, ids=[c[0] for c in CASES])
def test_api_refuses_and_changes_nothing(tmp_path, source, monkeypatch, name, setup, overwrite, words):
    cwd, output = setup(tmp_path)
    monkeypatch.chdir(cwd)
    model = AutoMoEPruneModelForCausalLM.from_pretrained(source)
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileExistsError)) as error:
        model.save_pretrained(output, overwrite=overwrite)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert snapshot(tmp_path) == before


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hf_moeprune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("name", "setup", "overwrite", "words"), [CASES[0], CASES[2], CASES[4], CASES[6]],
                         ids=[CASES[i][0] for i in (0, 2, 4, 6)])
def test_cli_refuses_before_loading_and_changes_nothing(tmp_path, source, name, setup, overwrite, words):
    cwd, output = setup(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(["prune", "--model", str(source), "--method", "random", "--experts-per-layer", "3",
                      "--output", str(output), *(["--overwrite"] if overwrite else [])], cwd)
    assert result.returncode != 0
    assert "hf-moeprune: error:" in result.stderr and all(word in result.stderr for word in words), result.stderr
    assert "Traceback" not in result.stderr  # run_recipe raises SystemExit with the message
    assert snapshot(tmp_path) == before


def test_cli_overwrite_replaces_an_earlier_output_which_reloads(tmp_path, source):
    out = tmp_path / "out"
    args = ["prune", "--model", str(source), "--method", "random", "--experts-per-layer", "3", "--output", str(out)]
    assert run_cli(args, tmp_path).returncode == 0
    refused = run_cli(args, tmp_path)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr
    result = run_cli([*args[:-3], "2", "--output", str(out), "--overwrite"], tmp_path)
    assert result.returncode == 0, result.stderr
    reloaded = AutoMoEPruneModelForCausalLM.from_pretrained(out)
    assert [layer.num_experts for layer in reloaded.moe_layers()] == [2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_empty_folder_is_written_into(tmp_path, source):
    (tmp_path / "out").mkdir()
    folder = AutoMoEPruneModelForCausalLM.from_pretrained(source).save_pretrained(tmp_path / "out")
    assert (folder / "config.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_created_folder_follows_umask(tmp_path, source, umask):
    model = AutoMoEPruneModelForCausalLM.from_pretrained(source)
    previous = os.umask(umask)
    try:
        folder = model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    # every file too, the weights included (safetensors writes its own files 0600)
    assert {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()} == {
        path.name: 0o666 & ~umask for path in folder.iterdir()}


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hf_moeprune import AutoMoEPruneModelForCausalLM

    model = AutoMoEPruneModelForCausalLM.from_pretrained(sys.argv[1])
    original = type(model.model).save_pretrained

    def slow(self, folder, **kwargs):
        original(self, folder, **kwargs)  # part of the staging folder is written
        Path(sys.argv[3]).write_text("ready")
        time.sleep(600)

    type(model.model).save_pretrained = slow
    model.save_pretrained(sys.argv[2], overwrite=True)
""")


def test_kill_9_during_save_keeps_old_checkpoint_and_next_save_cleans_up(tmp_path, source, caplog):
    model = AutoMoEPruneModelForCausalLM.from_pretrained(source)
    out = model.save_pretrained(tmp_path / "out")
    before = snapshot(out)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(source), str(out), str(ready)], env=env)
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "slow save never reached the write"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    staging = [p for p in tmp_path.iterdir() if STAGING_TAG in p.name]
    assert len(staging) == 1 and f"{STAGING_TAG}-{process.pid}-" in staging[0].name
    assert (staging[0] / "config.json").exists()  # the kill came after part of the write
    assert snapshot(out) == before

    caplog.set_level("WARNING", logger="hf_moeprune.checkpoint")
    model.save_pretrained(out, overwrite=True)
    assert not staging[0].exists() and str(staging[0]) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "ready"]
    assert AutoMoEPruneModelForCausalLM.from_pretrained(out).moe_layers()
