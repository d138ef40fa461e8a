"""Recipe files: `hf-moeprune run` repeats a multi-step run exactly, from `--save-recipe` or from the card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import build_tiny_model
from test_streaming import tensors

from hf_moeprune.cli import main
from hf_moeprune.hub.card import read_run_recipe_from_card


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_tokenizer, sample_texts):
    monkeypatch.chdir(tmp_path)
    model = build_tiny_model("mixtral", num_hidden_layers=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts))
    recipe = {
        "model": "base",
        "calibration": {"source": "texts.jsonl", "seq_len": 16, "max_sequences": 8},
        "steps": [
            {"method": "uncurl", "experts_per_layer": 4},
            {"method": "stun", "expert_sparsity": 0.25},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def test_card_recipe_of_a_two_step_run_reproduces_it(workspace):
    assert main(["run", "recipe.yaml", "--output", "first", "--no-progress"]) == 0
    steps = json.loads((workspace / "first/config.json").read_text())["moeprune"]["steps"]
    assert [step["method"] for step in steps] == ["uncurl", "stun"]
    card_recipe = read_run_recipe_from_card(workspace / "first/README.md")
    written = yaml.safe_load((workspace / "recipe.yaml").read_text())
    assert card_recipe["model"] == "base" and card_recipe["calibration"] == {**written["calibration"], "batch_size": 8}
    assert [(s["method"], s.get("experts_per_layer"), s.get("expert_sparsity")) for s in card_recipe["steps"]] == [
        ("uncurl", 4, None), ("stun", None, 0.25)]
    (workspace / "from_card.yaml").write_text(yaml.safe_dump(card_recipe))
    assert main(["run", "from_card.yaml", "--output", "second", "--no-progress"]) == 0
    first, second = tensors(workspace / "first"), tensors(workspace / "second")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    card = (workspace / "first/README.md").read_text()
    assert "hf-moeprune run recipe.yaml" in card and "model.merge_experts(" in card and "model.prune_experts(" in card


def test_streamed_recipe_equals_the_in_memory_one(workspace):
    assert main(["run", "recipe.yaml", "--output", "memory", "--in-memory", "--no-progress"]) == 0
    assert main(["run", "recipe.yaml", "--output", "streamed", "--streaming", "--no-progress"]) == 0
    memory, streamed = tensors(workspace / "memory"), tensors(workspace / "streamed")
    assert memory.keys() == streamed.keys() and all(torch.equal(memory[k], streamed[k]) for k in memory)
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".")) == []


def test_save_recipe_of_a_prune_run_repeats_it(workspace):
    command = ["prune", "--model", "base", "--method", "reap", "--experts-per-layer", "4",
               "--calibration", "texts.jsonl", "--seq-len", "16", "--no-progress"]
    assert main([*command, "--output", "direct", "--save-recipe", "saved.yaml"]) == 0
    saved = yaml.safe_load((workspace / "saved.yaml").read_text())
    assert saved["steps"][0]["method"] == "reap" and saved["calibration"]["seq_len"] == 16
    assert main(["run", "saved.yaml", "--output", "again", "--no-progress"]) == 0
    direct, again = tensors(workspace / "direct"), tensors(workspace / "again")
    assert all(torch.equal(direct[k], again[k]) for k in direct)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("steps: []", "needs a `steps:` list"),
        ("model: base\nsteps: [{method: frequency, expert_per_layer: 4}]", "unknown key(s) ['expert_per_layer']"),
        ("steps: [{method: frequency, experts_per_layer: 4}]\nmodels: x", "unknown key(s) ['models']"),
        ("steps: [{method: nope, experts_per_layer: 4}]", "Unknown method 'nope'"),
        ("steps: [{method: frequency: 4}", "not valid YAML"),
        ("calibration: {sauce: x}\nsteps: [{method: frequency, experts_per_layer: 4}]", "unknown calibration key"),
    ],
)
def test_bad_recipes_are_one_line_errors(workspace, capsys, content, message):
    (workspace / "bad.yaml").write_text(content)
    assert main(["run", "bad.yaml", "--output", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-moeprune: error:") and message in err and len(err.splitlines()) == 1
    assert not (workspace / "out").exists()


def test_card_never_publishes_a_local_path_and_names_the_given_base_model(workspace):
    command = ["prune", "--model", str(workspace / "base"), "--method", "stun", "--expert-sparsity", "0.25"]
    assert main([*command, "--output", "plain", "--no-progress"]) == 0
    assert str(workspace) not in (workspace / "plain/README.md").read_text()
    assert json.loads((workspace / "plain/config.json").read_text())["moeprune"]["base_model"] is None
    assert main([*command, "--output", "named", "--base-model", "me/tiny-base", "--no-progress"]) == 0
    card = (workspace / "named/README.md").read_text()
    assert "base_model: me/tiny-base" in card and "experts pruned by" in card
    assert main([*command, "--output", "bad", "--base-model", "/abs/path"]) == 2
