"""Testbed training resumes exactly: stopping and resuming gives the state of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from hf_moeprune.testbed.data import DATA_DIR
from hf_moeprune.testbed.train import RESUME_DIR, STATE_FILE, main

TINY = {
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def _run(output, *extra: str, tokenizer=None) -> dict:
    return main(
        [
            "--documents",
            str(DATA_DIR / "calibration.jsonl.gz"),
            "--experts",
            "4",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            *(["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", "400"]),
            "--log-every",
            "1",
            "--save-dtype",
            "float32",
            "--config-overrides",
            json.dumps(TINY),
            "--output",
            str(output),
            *extra,
        ]
    )


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("whole")
    return output, _run(output)


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tmp_path, uninterrupted):
    whole, whole_report = uninterrupted
    parts = tmp_path / "parts"
    stopped = _run(parts, "--stop-at-step", "3", "--checkpoint-every", "2", tokenizer=whole)
    assert stopped == {"stopped_at_step": 3, "steps": 6}
    assert (parts / RESUME_DIR / STATE_FILE).exists() and not (parts / "model.safetensors").exists()
    resumed = _run(parts, "--resume", tokenizer=whole)
    assert resumed["final_lm_loss_mean_last_1_steps"] == whole_report["final_lm_loss_mean_last_1_steps"]
    expected, found = _weights(whole), _weights(parts)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    log = (parts / "train.log").read_text()
    assert "stopped at step 3/6" in log and "resumed from" in log and "step 6/6" in log


def test_resume_refuses_a_state_of_another_run(tmp_path, uninterrupted):
    whole, _ = uninterrupted
    _run(tmp_path, "--stop-at-step", "2", tokenizer=whole)
    with pytest.raises(ValueError, match="another run.*seq_len"):
        main(
            [
                "--documents",
                str(DATA_DIR / "calibration.jsonl.gz"),
                "--experts",
                "4",
                "--steps",
                "6",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--tokenizer",
                str(whole),
                "--config-overrides",
                json.dumps(TINY),
                "--output",
                str(tmp_path),
                "--resume",
            ]
        )


def test_per_layer_balance_loss_sees_a_collapsed_layer_that_the_pooled_loss_misses():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from hf_moeprune.testbed.train import per_layer_balance_loss

    tokens, experts = 64, 4
    # Layer 0 sends every token to experts 0 and 1, layer 1 to experts 2 and 3: pooled, all four look equal.
    first = torch.tensor([5.0, 4.0, 0.0, 0.0]).repeat(tokens, 1)
    second = torch.tensor([0.0, 0.0, 5.0, 4.0]).repeat(tokens, 1)
    balanced = torch.eye(experts).repeat(tokens // experts, 1) * 5 + torch.eye(experts).roll(1, 1).repeat(
        tokens // experts, 1
    )
    pooled = load_balancing_loss_func((first, second), experts, top_k=2)
    pooled_balanced = load_balancing_loss_func((balanced, balanced), experts, top_k=2)
    assert float(pooled) == pytest.approx(float(pooled_balanced), rel=0.05)
    assert float(per_layer_balance_loss((balanced, balanced), top_k=2)) == pytest.approx(1.0, rel=0.05)
    assert float(per_layer_balance_loss((first, second), top_k=2)) > 1.7
