"""The shipped testbed MoEs, their data split and the training script."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from hf_moeprune import testbed
from hf_moeprune.testbed import (
    DOMAINS,
    TESTBEDS,
    calibration_documents,
    default_model_path,
    heldout_documents,
    split_of,
)
from hf_moeprune.testbed.data import DATA_DIR

BUNDLES_PRESENT = all((DATA_DIR / f"{n}.jsonl.gz").exists() for n in ("heldout", "calibration"))


def _trained(name: str) -> bool:
    return (testbed.testbed_path(name) / "model.safetensors").exists() and (
        testbed.testbed_path(name) / "testbed_metrics.json"
    ).exists()


def test_bundles_respect_the_split():
    held, calib = heldout_documents(), calibration_documents()
    assert held and calib
    assert all(split_of(d.name) == "heldout" for d in held)
    assert all(split_of(d.name) == "calibration" for d in calib)
    assert not {d.text for d in held} & {d.text for d in calib}
    assert {d.domain for d in held} == {d.domain for d in calib} == set(DOMAINS)
    assert {d.topic for d in held if d.domain == "bbc"} == {
        "business",
        "entertainment",
        "politics",
        "sport",
        "tech",
    }
    assert calibration_documents(domain="bbc", topic="sport")
    assert all(d.topic == "sport" for d in calibration_documents(domain="bbc", topic="sport"))


def test_split_is_stable_and_about_one_in_ten():
    names = [f"bbc/sport/{i:03d}" for i in range(1000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    assert 0.07 < splits.count("heldout") / 1000 < 0.13
    assert 0.07 < splits.count("calibration") / 1000 < 0.13


def test_unknown_testbed_lists_known():
    with pytest.raises(ValueError, match="mixtral-8e"):
        testbed.testbed_path("mixtral-3e")


@pytest.mark.parametrize("name", TESTBEDS)
def test_testbed_reloads_with_plain_transformers_and_documented_perplexity(name):
    if not _trained(name):
        pytest.skip(f"{name} not trained in this checkout")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.evaluate import perplexity
    from hf_moeprune.testbed.report import METRICS_FILE, slice_documents

    folder = testbed.testbed_path(name)
    assert (folder / "model.safetensors").stat().st_size < 42 * 2**20
    metrics = json.loads((folder / METRICS_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.model_type == "mixtral"
    assert model.config.num_local_experts == metrics["num_local_experts"]
    documents = slice_documents()
    assert [d.name for d in documents] == metrics["slice_perplexity"]["documents"]
    torch.set_num_threads(1)
    result = perplexity(
        model, tokenizer, documents, window=metrics["slice_perplexity"]["window"], progress=False
    )
    # float32 sums differ between CPUs only in the last digits (3e-9 relative between thread counts here)
    assert result["overall"]["perplexity"] == pytest.approx(
        metrics["slice_perplexity"]["perplexity"], rel=1e-5
    )
    # A trained model, far from uniform guessing over the vocabulary.
    assert metrics["heldout_perplexity"]["overall"]["perplexity"] < len(tokenizer) / 20


def test_default_model_is_the_8_expert_testbed():
    assert default_model_path() == testbed.testbed_path("mixtral-8e")


@pytest.mark.parametrize("name", TESTBEDS)
def test_testbed_routes_the_two_domains_to_different_experts(name):
    """Recomputed on a few held-out documents: the Jensen-Shannon divergence between BBC's and Shakespeare's
    expert-choice histograms is well above the divergence between two random halves of one domain (what
    sampling noise alone gives). Fails for a model whose router ignores the text, or an untrained one."""
    if not _trained(name):
        pytest.skip(f"{name} not trained in this checkout")
    from hf_moeprune.evaluate import heldout_subset
    from hf_moeprune.testbed.report import js_divergence, load_testbed, routing_counts

    torch.set_num_threads(1)
    model, tokenizer = load_testbed(testbed.testbed_path(name))
    # the first 256 tokens or so of 8 documents per domain: about 2,000 routed tokens per domain
    per_domain = {
        domain: [replace(d, text=d.text[:1200]) for d in heldout_subset(heldout_documents(domain), 8)]
        for domain in ("bbc", "shakespeare")
    }
    counts = {domain: routing_counts(model, tokenizer, docs) for domain, docs in per_domain.items()}
    between = js_divergence(counts["bbc"].sum(0), counts["shakespeare"].sum(0)).mean()
    noise = max(js_divergence(c[::2].sum(0), c[1::2].sum(0)).mean() for c in counts.values())
    assert between > 3 * noise, (float(between), float(noise))


def test_training_script_runs_a_few_steps(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.testbed.train import main

    tiny = {
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    }
    output = tmp_path / "tiny"
    report = main(
        [
            "--documents",
            str(DATA_DIR / "calibration.jsonl.gz"),
            "--experts",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--vocab-size",
            "400",
            "--log-every",
            "1",
            "--config-overrides",
            json.dumps(tiny),
            "--output",
            str(output),
        ]
    )
    assert report["steps"] == 3 and report["training_tokens"] == 3 * 2 * 32
    assert math.isfinite(report["final_lm_loss_mean_last_1_steps"])
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.num_local_experts == 4 and model.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(output)) == model.config.vocab_size
    again = main(
        [
            "--documents",
            str(DATA_DIR / "calibration.jsonl.gz"),
            "--experts",
            "4",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--tokenizer",
            str(output),
            "--log-every",
            "1",
            "--config-overrides",
            json.dumps(tiny),
            "--output",
            str(tmp_path / "again"),
        ]
    )
    assert again["final_lm_loss_mean_last_1_steps"] == pytest.approx(
        report["final_lm_loss_mean_last_1_steps"], rel=1e-5
    )


def test_testbeds_share_backbone_and_tokenizer():
    """The 8- and 32-expert testbeds differ only in their experts, so comparisons between them are fair: every
    other weight has the same shape, and both tokenise text to the same ids."""
    if not all(_trained(name) for name in TESTBEDS):
        pytest.skip("testbeds not trained in this checkout")
    from hf_moeprune.testbed.report import load_testbed
    from hf_moeprune.testbed.train import BACKBONE

    loaded = {name: load_testbed(testbed.testbed_path(name)) for name in TESTBEDS}
    shapes = {
        name: {
            n: tuple(p.shape)
            for n, p in model.named_parameters()
            if ".experts." not in n and ".gate." not in n
        }
        for name, (model, _) in loaded.items()
    }
    assert shapes["mixtral-8e"] == shapes["mixtral-32e"]
    assert [loaded[n][0].config.num_local_experts for n in TESTBEDS] == [8, 32]
    for model, _ in loaded.values():
        for key, value in BACKBONE.items():
            if key == "router_aux_loss_coef":  # training only: the per-layer balance loss replaced it (saved as 0)
                continue
            found = (
                model.config.rope_parameters["rope_theta"]
                if key == "rope_theta"
                else getattr(model.config, key)
            )
            assert found == value, key
    text = heldout_documents()[0].text
    ids = [tokenizer(text)["input_ids"] for _, tokenizer in loaded.values()]
    assert ids[0] == ids[1] and len(ids[0]) > 100
