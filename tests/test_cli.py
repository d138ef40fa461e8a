"""The console commands a user runs: inspect, prune and merge on a checkpoint folder."""

from __future__ import annotations

import json

import torch
from conftest import VOCAB, build_tiny_model, logits_of
from transformers import AutoModelForCausalLM

from hf_moeprune.cli import main


def test_prune_then_inspect_from_the_command_line(tmp_path, tiny_tokenizer, sample_texts, capsys):
    source = tmp_path / "base"
    build_tiny_model("mixtral").save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    calibration = tmp_path / "texts.txt"
    calibration.write_text("\n\n".join(sample_texts))

    assert main(["prune", "--model", str(source), "--method", "frequency", "--experts-per-layer", "3",
                 "--calibration", str(calibration), "--seq-len", "32", "--output", str(tmp_path / "out")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert pruned.config.num_local_experts == 3
    logits_of(pruned, torch.randint(4, VOCAB, (1, 8)))

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [entry["num_experts"] for entry in record["layers"].values()] == [3, 3]
    assert record["steps"][0]["config"]["method"] == "frequency"
    assert record["parameters"]["after"] < record["parameters"]["before"]


def test_inspect_reads_no_weights(tmp_path, capsys):
    source = tmp_path / "base"
    build_tiny_model("qwen2_moe").save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(source)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("model.layers.")]
    assert rows == [["model.layers.0.mlp", "6", "6", "2"], ["model.layers.1.mlp", "6", "6", "2"]]


def test_merge_refuses_a_pruning_method_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "base"
    build_tiny_model("mixtral").save_pretrained(source)
    capsys.readouterr()
    code = main(["merge", "--model", str(source), "--method", "random", "--experts-per-layer", "3",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    assert "use `hf-moeprune prune`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_loads_a_non_uniform_checkpoint(tmp_path, tiny_tokenizer, capsys):
    """The harness must read checkpoints whose layers keep different expert counts, as saved by STUN."""
    from hf_moeprune import AutoMoEPruneModelForCausalLM, LayerPlan, ReductionPlan

    model = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tiny_tokenizer)
    layers = model.moe_layers()
    model.apply_plan(ReductionPlan({layers[0].path: LayerPlan.keep([0, 1, 2]), layers[1].path: LayerPlan.keep([3, 4])}))
    folder = model.save_pretrained(tmp_path / "nonuniform")
    capsys.readouterr()
    output = tmp_path / "rows.json"
    assert main(["eval", "--model", str(folder), "--tasks", "ppl", "--limit", "2", "--no-progress",
                 "--output", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["task", "metric", "n", "value"]  # a table
    rows = json.loads(output.read_text())
    overall = next(row for row in rows if row["task"] == "ppl")
    assert overall["metric"] == "perplexity" and overall["value"] > 1 and overall["n"] == 2
