"""Bad input through the CLI and the API: one clear error, before any work, and nothing on disk changed.

Each CLI case asserts the exit code, that stderr names the problem in one `hf-moeprune: error:` line with no
traceback, that calibration never ran and that the files under tmp_path are unchanged. Two cases go through
a real subprocess to prove the end-to-end behaviour; the rest call `hf_moeprune.cli.main` in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_tiny_model

from hf_moeprune import AutoMoEPruneModelForCausalLM, MoEPruneConfig
from hf_moeprune.calibration import statistics
from hf_moeprune.cli import main
from hf_moeprune.methods import registered_methods

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("bad")
    build_tiny_model("mixtral").save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    (root / "texts.txt").write_text("The committee met on Tuesday.\n\nShall I compare thee to a summer's day?\n")
    (root / "binary.txt").write_bytes(b"fine first line\n\xff\xfe\x00 binary\n")
    (root / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n')
    (root / "fields.jsonl").write_text('{"text": "ok"}\n{"content": "x", "id": 3}\n')
    (root / "table.csv").write_text("body,label\nsome text,1\n")
    (root / "empty.jsonl").write_text("")
    (root / "cal.docx").write_bytes(b"PK\x03\x04")
    (root / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "Hello"}]}\n')
    (root / "notes").mkdir()
    (root / "notes" / "keep.md").write_text("the user's notes")
    (root / "nomodel").mkdir()
    return root


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("calibration must not run for an invalid request")

    monkeypatch.setattr(statistics, "run_calibration", refuse)


# (id, argv with {ws} for the workspace, exit code, words the message must contain)
CLI_CASES = [
    ("unknown-method", ["prune", "--method", "nope", "--experts-per-layer", "3"], 2, ["nope", "--method"]),
    ("merge-verb-for-prune-method", ["merge", "--method", "frequency", "--experts-per-layer", "3"], 2,
     ["hf-moeprune prune"]),
    ("prune-verb-for-merge-method", ["prune", "--method", "uncurl", "--experts-per-layer", "3"], 2,
     ["hf-moeprune merge"]),
    ("seq-len-zero", ["prune", "--experts-per-layer", "3", "--seq-len", "0"], 2, ["--seq-len", "at least 1"]),
    ("batch-size-negative", ["prune", "--experts-per-layer", "3", "--batch-size", "-2"], 2, ["--batch-size"]),
    ("max-sequences-zero", ["prune", "--experts-per-layer", "3", "--max-sequences", "0"], 2, ["--max-sequences"]),
    ("option-without-equals", ["prune", "--experts-per-layer", "3", "--option", "distance"], 2,
     ["KEY=VALUE", "distance"]),
    ("option-typo-frequency", ["prune", "--experts-per-layer", "3", "--option", "distanse=router"], 2,
     ["distanse", "valid options: uniform"]),
    ("option-typo-stun", ["prune", "--method", "stun", "--experts-per-layer", "3", "--option", "distanse=mix"], 2,
     ["distanse", "distance"]),
    ("option-typo-reap", ["prune", "--method", "reap", "--experts-per-layer", "3", "--option", "protect=1"], 2,
     ["protect", "protect_super_experts"]),
    ("option-typo-naee", ["prune", "--method", "naee", "--experts-per-layer", "3", "--option", "max_subset=5"], 2,
     ["max_subset", "max_subsets"]),
    ("option-typo-uncurl", ["merge", "--experts-per-layer", "3", "--option", "clusterin=kmeans"], 2,
     ["clusterin", "clustering"]),
    ("option-bad-choice-uncurl", ["merge", "--experts-per-layer", "3", "--option", "clustering=magic"], 2,
     ["clustering", "kmeans"]),
    ("option-wrong-type-reap", ["prune", "--method", "reap", "--experts-per-layer", "3", "--option",
                                "super_expert_quantile=high"], 2, ["super_expert_quantile", "number"]),
    ("option-out-of-range-reap", ["prune", "--method", "reap", "--experts-per-layer", "3", "--option",
                                  "super_expert_fraction=3"], 2, ["super_expert_fraction", "[0, 1]"]),
    ("option-bool-wrong-stun", ["prune", "--method", "stun", "--experts-per-layer", "3", "--option",
                                "division_by_norm=maybe"], 2, ["division_by_norm", "true or false"]),
    ("option-choice-stun", ["prune", "--method", "stun", "--experts-per-layer", "3", "--option", "distance=cos"], 2,
     ["distance", "router"]),
    ("option-int-naee", ["prune", "--method", "naee", "--experts-per-layer", "3", "--option", "max_tokens=2.5"], 2,
     ["max_tokens", "whole number"]),
    ("option-targets-wanda", ["prune", "--method", "wanda", "--weight-sparsity", "0.5", "--option",
                              "targets=[3]"], 2, ["targets", "string"]),
    ("weight-sparsity-on-frequency", ["prune", "--experts-per-layer", "3", "--weight-sparsity", "0.5",
                                      "--unstructured", "owl"], 2, ["--weight-sparsity", "no unstructured phase"]),
    ("nm-on-reap", ["prune", "--method", "reap", "--experts-per-layer", "3", "--nm", "2:4"], 2, ["--nm"]),
    ("weight-sparsity-on-uncurl", ["merge", "--experts-per-layer", "3", "--weight-sparsity", "0.3"], 2,
     ["--weight-sparsity"]),
    ("nm-malformed", ["prune", "--method", "wanda", "--nm", "2-4"], 2, ["--nm", "N:M"]),
    ("nm-reversed", ["prune", "--method", "wanda", "--nm", "4:2"], 2, ["--nm", "0 < N < M"]),
    ("expert-sparsity-above-one", ["prune", "--expert-sparsity", "1.5"], 2, ["--expert-sparsity", "[0, 1)"]),
    ("weight-sparsity-negative", ["prune", "--method", "wanda", "--weight-sparsity", "-0.1"], 2,
     ["--weight-sparsity"]),
    ("experts-per-layer-zero", ["prune", "--experts-per-layer", "0"], 2, ["--experts-per-layer", ">= 1"]),
    ("top-k-zero", ["prune", "--experts-per-layer", "3", "--top-k", "0"], 2, ["--top-k"]),
    ("no-target", ["prune", "--method", "frequency"], 2, ["expert target", "--experts-per-layer"]),
    ("target-not-below-count", ["prune", "--experts-per-layer", "6"], 2, ["not below the 6 experts"]),
    ("target-below-top-k", ["prune", "--experts-per-layer", "1"], 2, ["top-k of 2", "--top-k"]),
    ("top-k-above-model", ["prune", "--experts-per-layer", "3", "--top-k", "3"], 2, ["--top-k", "lowered"]),
    ("wanda-with-expert-target", ["prune", "--method", "wanda", "--experts-per-layer", "3",
                                  "--weight-sparsity", "0.5"], 2, ["expert targets", "stun"]),
    ("wanda-without-sparsity", ["prune", "--method", "wanda"], 2, ["--weight-sparsity"]),
    ("stun-unstructured-without-sparsity", ["prune", "--method", "stun", "--experts-per-layer", "3",
                                            "--unstructured", "owl"], 2, ["--unstructured", "sparsity"]),
    ("naee-too-many-subsets", ["prune", "--method", "naee", "--experts-per-layer", "3", "--option",
                               "max_subsets=2"], 2, ["C(6, 3)", "max_subsets"]),
    ("missing-calibration-file", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/nope.txt"], 2,
     ["--calibration", "nope.txt"]),
    ("binary-calibration-file", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/binary.txt"], 2,
     ["binary.txt", "line 2", "UTF-8"]),
    ("malformed-jsonl", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/broken.jsonl"], 2,
     ["broken.jsonl", "line 4", "malformed JSON"]),
    ("jsonl-without-text", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/fields.jsonl"], 2,
     ["fields.jsonl", "line 2", "'text'", "content"]),
    ("csv-wrong-column", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/table.csv"], 2,
     ["table.csv", "no 'text' column", "body", "--text-column"]),
    ("csv-missing-named-column", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/table.csv",
                                  "--text-column", "content"], 2, ["no 'content' column"]),
    ("empty-calibration-file", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/empty.jsonl"], 2,
     ["empty.jsonl", "empty"]),
    ("split-of-a-single-file", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/table.csv",
                                "--text-column", "body", "--split", "test"], 2, ["'train' split", "--split"]),
    ("chat-template-on-plain-text", ["prune", "--experts-per-layer", "3", "--chat-template"], 2,
     ["texts.txt", "no 'messages' column"]),
    ("chat-template-tokenizer-without-one", ["prune", "--experts-per-layer", "3", "--calibration",
                                             "{ws}/chats.jsonl", "--chat-template"], 2, ["--chat-template", "base",
                                                                                          "no chat template"]),
    ("num-samples-zero", ["prune", "--experts-per-layer", "3", "--num-samples", "0"], 2, ["--num-samples"]),
    ("unknown-calibration-type", ["prune", "--experts-per-layer", "3", "--calibration", "{ws}/cal.docx"], 2,
     ["cal.docx", "not a data file type"]),
    ("calibration-names-nothing", ["prune", "--experts-per-layer", "3", "--calibration", "./no/such/data"], 2,
     ["--calibration", "names no file or folder"]),
    ("missing-local-model", ["prune", "--experts-per-layer", "3", "--model", "{ws}/missing-model"], 2,
     ["missing-model", "no such folder"]),
    ("relative-missing-model", ["prune", "--experts-per-layer", "3", "--model", "./no/such/model"], 2,
     ["no such folder"]),
    ("model-is-a-file", ["prune", "--experts-per-layer", "3", "--model", "{ws}/texts.txt"], 2, ["not a checkpoint"]),
    ("model-folder-without-config", ["prune", "--experts-per-layer", "3", "--model", "{ws}/nomodel"], 2,
     ["config.json"]),
]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(workspace, no_calibration, capsys, argv, code, words):
    argv = [a.replace("{ws}", str(workspace)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(workspace / "base")]
    if "--calibration" not in argv:
        argv += ["--calibration", str(workspace / "texts.txt")]
    output = workspace / "out"
    before = tree_digest(workspace)
    capsys.readouterr()
    assert main([*argv, "--output", str(output)]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-moeprune: error: ")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    assert not output.exists()
    assert tree_digest(workspace) == before


def test_cli_errors_before_the_model_loads(workspace, monkeypatch, capsys):
    """Option and calibration-file errors arrive before any weights are read."""
    from hf_moeprune import modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an invalid request")

    monkeypatch.setattr(modeling._AutoMoEPruneModel, "from_pretrained", classmethod(refuse))
    for extra in (["--option", "distanse=1"], ["--calibration", str(workspace / "binary.txt")], ["--seq-len", "0"],
                  ["--calibration", str(workspace / "table.csv")],
                  ["--calibration", str(workspace / "chats.jsonl"), "--chat-template"]):
        assert main(["prune", "--experts-per-layer", "3", "--model", str(workspace / "base"), *extra,
                     "--output", str(workspace / "out")]) == 2
        assert "hf-moeprune: error:" in capsys.readouterr().err


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, "-m", "hf_moeprune.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_subprocess_missing_model_no_traceback_no_network(workspace):
    """End to end: a missing local folder is one line, fast, with no Hub retries."""
    result = run_cli(["prune", "--experts-per-layer", "3", "--model", str(workspace / "gone"),
                      "--output", str(workspace / "out")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"hf-moeprune: error: --model {workspace / 'gone'}: no such folder."]
    assert not (workspace / "out").exists()


def test_subprocess_debug_shows_the_traceback(workspace):
    args = ["prune", "--method", "nope", "--experts-per-layer", "3", "--model", str(workspace / "base"),
            "--output", str(workspace / "out")]
    quiet, loud = run_cli(args), run_cli([*args, "--debug"])
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "Unknown method 'nope'" in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


# ------------------------------------------------------------------------------------------------ API


@pytest.fixture
def model(tiny_tokenizer):
    return AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tiny_tokenizer)


def _frequency(**kwargs) -> MoEPruneConfig:
    return MoEPruneConfig(method="frequency", experts_per_layer=3, **kwargs)


API_CONFIG_CASES = [
    ("float-count", dict(method="frequency", experts_per_layer=4.5), "experts_per_layer"),
    ("bool-count", dict(method="frequency", experts_per_layer=True), "experts_per_layer"),
    ("string-total", dict(method="frequency", num_experts_total="6"), "num_experts_total"),
    ("float-top-k", dict(method="frequency", experts_per_layer=3, top_k=1.5), "top_k"),
    ("string-sparsity", dict(method="frequency", expert_sparsity="half"), "expert_sparsity"),
    ("adaptive-not-bool", dict(method="frequency", experts_per_layer=3, adaptive="yes"), "adaptive"),
]


@pytest.mark.parametrize("kwargs, words", [c[1:] for c in API_CONFIG_CASES], ids=[c[0] for c in API_CONFIG_CASES])
def test_api_bad_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MoEPruneConfig(**kwargs)


API_CALIBRATION_CASES = [
    ("str-not-a-file", "cal.txt", "names no file"),
    ("float-tokens", torch.rand(2, 16) * 10, "integer tensor"),
    ("negative-ids", torch.full((2, 16), -1, dtype=torch.long), ">= 0"),
    ("ids-above-vocab", torch.full((2, 16), VOCAB, dtype=torch.long), f"vocabulary of {VOCAB}"),
    ("float-token-list", [torch.ones(16)], "integer tensor"),
]


@pytest.mark.parametrize("calibration, words", [c[1:] for c in API_CALIBRATION_CASES],
                         ids=[c[0] for c in API_CALIBRATION_CASES])
def test_api_bad_calibration(model, no_calibration, calibration, words):
    with pytest.raises(ValueError, match=words):
        model.prune_experts(_frequency(), calibration=calibration)
    assert [layer.num_experts for layer in model.moe_layers()] == [6, 6]


@pytest.mark.parametrize("options, words", [
    (dict(seq_len=0), "seq_len"), (dict(batch_size=0), "batch_size"), (dict(max_sequences=-1), "max_sequences"),
])
def test_api_bad_calibration_options(model, no_calibration, sample_texts, options, words):
    with pytest.raises(ValueError, match=words):
        model.prune_experts(_frequency(), calibration=sample_texts, **options)


@pytest.mark.parametrize("method, options, words", [
    ("reap", {"super_expert_quantile": "high"}, "super_expert_quantile"),
    ("random", {"distanse": 1}, "no options"),
    ("frequency", {"distanse": 1}, "valid options: uniform"),
    ("stun", {"distanse": "mix"}, "valid options: .*distance"),
])
def test_api_bad_method_options(model, no_calibration, sample_texts, method, options, words):
    with pytest.raises(ValueError, match=words):
        model.prune_experts(MoEPruneConfig(method=method, experts_per_layer=3, method_options=options),
                            calibration=sample_texts)


def test_api_string_naming_a_file_is_read_as_that_file(model, tmp_path, sample_texts):
    path = tmp_path / "cal.txt"
    path.write_text("\n\n".join(sample_texts))
    model.prune_experts(_frequency(), calibration=str(path), seq_len=32)
    calibration = model.record["steps"][0]["calibration"]
    assert calibration["description"].startswith(f"{path}, column 'text'")  # names the file and column
    assert calibration["num_tokens"] >= 32 * 4  # the texts' characters, not the 7 of the name


def test_option_values_are_converted_and_recorded(model, sample_texts):
    config = MoEPruneConfig(method="reap", experts_per_layer=3,
                            method_options={"protect_super_experts": "false", "super_expert_quantile": 1})
    model.prune_experts(config, calibration=sample_texts, seq_len=32)
    assert model.record["steps"][0]["config"]["method_options"] == {
        "protect_super_experts": False, "super_expert_quantile": 1.0,
    }


def test_eval_refuses_missing_weights(tmp_path, tiny_tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "half"
    build_tiny_model("mixtral").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    dropped = next(name for name in weights if "q_proj" in name)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--tasks", "ppl", "--limit", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and dropped in err


# ----------------------------------------------------------------------------------------- reproducibility


def _reduce(method: str, tokenizer, texts: list[str], folder: Path) -> Path:
    cls = registered_methods()[method]
    wrapped = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tokenizer)
    if cls.kind == "unstructured":
        config = MoEPruneConfig(method=method, weight_sparsity=0.5, seed=3)
    else:
        config = MoEPruneConfig(method=method, experts_per_layer=4, seed=3)
    step = wrapped.merge_experts if cls.kind == "merge" else wrapped.prune_experts
    step(config, calibration=texts, seq_len=32, max_sequences=4)
    return wrapped.save_pretrained(folder)


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_same_seed_gives_identical_files(method, tmp_path, tiny_tokenizer, sample_texts):
    first = _reduce(method, tiny_tokenizer, sample_texts, tmp_path / "a")
    second = _reduce(method, tiny_tokenizer, sample_texts, tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert "alignment_seconds" not in json.dumps(json.loads((first / "config.json").read_text()))
