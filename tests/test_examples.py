"""Every example in examples/ runs as documented and does what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hf_moeprune.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, check=True)
    return done.stdout


def test_prune_and_reload(tmp_path):
    out = run_example("prune_and_reload.py", str(tmp_path / "pruned"))
    assert "4 experts per layer; reloaded logits identical: True" in out


def test_stream_checkpoint(tmp_path):
    run_example("stream_checkpoint.py", str(tmp_path / "streamed"))
    record = json.loads((tmp_path / "streamed/config.json").read_text())["moeprune"]
    assert record["steps"][0]["method"] == "stun" and record["steps"][0]["forward_passes"] == 0


def test_merge_then_prune_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the recipe names the testbed relative to the repository root
    assert main(["run", str(EXAMPLES / "merge_then_prune.yaml"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out/config.json").read_text())["moeprune"]
    assert [step["method"] for step in record["steps"]] == ["uncurl", "stun"]
    assert all(entry["num_experts"] <= 16 for entry in record["layers"].values())
