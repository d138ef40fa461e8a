"""Calibration sources read with `datasets`: every local format, folders, saved datasets, chat data, the record."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import hub_fixtures
import pytest
import torch
from conftest import build_tiny_model
from datasets import Dataset, DatasetDict

from hf_moeprune.calibration import prepare_calibration, read_calibration_source

local_hub = hub_fixtures.local_hub

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _write(kind: str, folder: Path, texts: list[str]) -> Path:
    """`texts` stored as one calibration source of `kind`; returns what to pass as `calibration=`."""
    records = [{"id": i, "text": t} for i, t in enumerate(texts)]
    if kind == "txt":
        path = folder / "cal.txt"
        path.write_text("\n\n".join(texts) + "\n")
    elif kind == "jsonl":
        path = folder / "cal.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "jsonl.gz":
        path = folder / "cal.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    elif kind == "json":
        path = folder / "cal.json"
        path.write_text(json.dumps(records))
    elif kind in ("csv", "parquet"):
        path = folder / f"cal.{kind}"
        getattr(Dataset.from_list(records), f"to_{kind}")(str(path))
    elif kind == "folder":
        path = folder / "shards"
        path.mkdir()
        half = len(records) // 2
        for name, part in (("train-00000.jsonl", records[:half]), ("train-00001.jsonl", records[half:])):
            (path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    elif kind == "save_to_disk":
        path = folder / "saved"
        Dataset.from_list(records).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "json", "csv", "parquet", "folder", "save_to_disk"])
def test_every_local_format_gives_the_same_batches_as_the_texts(kind, tmp_path, tiny_tokenizer, sample_texts):
    expected = prepare_calibration(sample_texts, tiny_tokenizer, seq_len=32, batch_size=4)
    source = _write(kind, tmp_path, sample_texts)
    data = prepare_calibration(str(source), tiny_tokenizer, seq_len=32, batch_size=4)
    assert torch.equal(torch.cat(data.batches), torch.cat(expected.batches))
    assert data.record()["token_sha256"] == expected.record()["token_sha256"]
    assert data.description.startswith(str(source)) and f"{len(sample_texts)} rows" in data.description


def test_split_of_a_saved_dataset_dict(tmp_path, tiny_tokenizer, sample_texts):
    DatasetDict({
        "train": Dataset.from_dict({"text": ["not this one"] * 3}),
        "validation": Dataset.from_dict({"text": sample_texts}),
    }).save_to_disk(str(tmp_path / "dd"))
    rows, description = read_calibration_source(tmp_path / "dd", split="validation")
    assert rows == sample_texts and "split validation" in description
    assert read_calibration_source(tmp_path / "dd")[0] == ["not this one"] * 3  # train by default
    with pytest.raises(ValueError) as raised:
        read_calibration_source(tmp_path / "dd", split="test")
    assert str(raised.value) == f"{tmp_path / 'dd'}: no split 'test' (splits: ['train', 'validation']); choose one with split=."


@pytest.mark.parametrize(("splits", "read"), [(["validation"], "validation"), (["test", "train"], "train"), (["a", "b"], None)])
def test_a_saved_dataset_dict_without_split_reads_train_or_its_only_split(tmp_path, splits, read):
    DatasetDict({name: Dataset.from_dict({"text": [f"row of {name}"]}) for name in splits}).save_to_disk(str(tmp_path / "dd"))
    if read is None:
        with pytest.raises(ValueError) as raised:
            read_calibration_source(tmp_path / "dd")
        assert str(raised.value) == f"{tmp_path / 'dd'}: no split 'train' (splits: ['a', 'b']); choose one with split=."
    else:
        assert read_calibration_source(tmp_path / "dd")[0] == [f"row of {read}"]


def test_text_column_and_num_samples(tmp_path, tiny_tokenizer, sample_texts):
    path = tmp_path / "cal.csv"
    Dataset.from_dict({"body": sample_texts, "label": list(range(len(sample_texts)))}).to_csv(str(path))
    rows, description = read_calibration_source(path, text_column="body", num_samples=3)
    assert rows == sample_texts[:3] and "column 'body'" in description and "3 rows" in description
    data = prepare_calibration(str(path), tiny_tokenizer, text_column="body", num_samples=3, seq_len=8)
    assert torch.equal(torch.cat(data.batches), torch.cat(prepare_calibration(sample_texts[:3], tiny_tokenizer,
                                                                               seq_len=8).batches))
    with pytest.raises(ValueError, match=r"cal.csv: no 'text' column \(columns: \['body', 'label'\]\)"):
        read_calibration_source(path)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_template_renders_the_messages_column(tmp_path, chat_tokenizer, tiny_tokenizer):
    conversations = [
        [{"role": "user", "content": "Who won the cup?"}, {"role": "assistant", "content": "The home side."}],
        [{"role": "user", "content": "Compare thee to what?"}, {"role": "assistant", "content": "A summer's day."}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    data = prepare_calibration(str(path), chat_tokenizer, chat_template=True, seq_len=16)
    rendered = [chat_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    assert rendered[0].startswith("<s>user: Who won the cup?\n<s>assistant:")
    assert torch.equal(torch.cat(data.batches), torch.cat(prepare_calibration(rendered, chat_tokenizer,
                                                                               seq_len=16).batches))
    assert data.description == f"{path}, column 'messages', 2 rows, chat template applied"
    with pytest.raises(ValueError, match="no chat template"):
        prepare_calibration(str(path), tiny_tokenizer, chat_template=True)
    with pytest.raises(ValueError, match=r"no 'text' column .*chat_template=True"):
        prepare_calibration(str(path), tiny_tokenizer)
    strings = tmp_path / "strings.jsonl"
    strings.write_text('{"text": "plain text, not messages"}\n')
    with pytest.raises(ValueError, match=r"strings.jsonl, line 1: chat_template=True needs a non-empty list"):
        read_calibration_source(strings, text_column="text", chat_template=True)


def test_in_memory_chat_rows_are_refused_by_name(chat_tokenizer, tiny_tokenizer):
    hello = [{"role": "user", "content": "hello"}]
    refusals = [
        ([hello], None, "chat_template=True needs a tokenizer: pass tokenizer=... (or load the model with one)."),
        ([hello], tiny_tokenizer, "The tokenizer has no chat template, so chat_template=True cannot apply; "
                                  "drop it or use an instruct model's tokenizer."),
        ([], chat_tokenizer, "The calibration set is empty."),
        ([hello, "hello"], chat_tokenizer, "Calibration row 2: chat_template=True needs a list of "
                                           "{'role', 'content'} messages per row."),
        ([hello, [hello[0], "hi"]], chat_tokenizer, "Calibration row 2: chat_template=True needs a list of "
                                                    "{'role', 'content'} messages per row."),
    ]
    for rows, tokenizer, message in refusals:
        with pytest.raises(ValueError) as raised:
            prepare_calibration(rows, tokenizer, chat_template=True)
        assert str(raised.value) == message


def test_record_has_sequence_length_and_data_hash(tiny_tokenizer, sample_texts):
    first = prepare_calibration(sample_texts, tiny_tokenizer, seq_len=32).record()
    again = prepare_calibration(list(sample_texts), tiny_tokenizer, seq_len=32).record()
    other = prepare_calibration(sample_texts[1:], tiny_tokenizer, seq_len=32).record()
    assert first["seq_len"] == 32 and len(first["token_sha256"]) == 64
    assert first == again and other["token_sha256"] != first["token_sha256"]
    ones = torch.ones(3, 12, dtype=torch.int32)
    assert prepare_calibration(ones).record() == {
        "description": "token tensor of shape (3, 12)", "num_sequences": 3, "num_tokens": 36, "seq_len": 12,
        "token_sha256": hashlib.sha256(ones.long().numpy().tobytes()).hexdigest(),
    }


def test_token_tensors_are_checked_then_packed():
    rows = [torch.arange(0, 10), torch.arange(10, 16, dtype=torch.int32)]
    data = prepare_calibration(rows, seq_len=4, batch_size=3, vocab_size=16)
    assert [b.tolist() for b in data.batches] == [torch.arange(12).view(3, 4).tolist(), [[12, 13, 14, 15]]]
    assert data.description == "2 token tensors" and data.batches[1].dtype == torch.long
    refusals = [
        ([torch.arange(4), torch.ones(4)], "Calibration token ids must be an integer tensor, got dtype torch.float32."),
        ([torch.arange(4), torch.tensor([True])], "Calibration token ids must be an integer tensor, got dtype torch.bool."),
        ([torch.arange(4), torch.tensor([3, -1])], "Calibration token ids must be >= 0, found -1."),
        ([torch.arange(4), torch.tensor([16])], "Calibration token id 16 is outside the model's vocabulary of 16 tokens."),
        (torch.tensor([[0, 16]]), "Calibration token id 16 is outside the model's vocabulary of 16 tokens."),
    ]
    for calibration, message in refusals:
        with pytest.raises(ValueError) as raised:
            prepare_calibration(calibration, seq_len=4, vocab_size=16)
        assert str(raised.value) == message


def _bos_tokenizer(tiny_tokenizer):
    """The character tokenizer, made to add `<s>` (id 2) in front of a text unless told not to."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def test_texts_are_joined_by_eos_without_special_tokens_cut_into_blocks_then_batched(tiny_tokenizer):
    tokenizer = _bos_tokenizer(tiny_tokenizer)
    assert tokenizer("ab")["input_ids"] == [2, 69, 70]  # the tokenizer would add <s>; packing must not
    ids = {c: ord(c) - 32 + 4 for c in "abcdefghij"}
    eos = tokenizer.eos_token_id
    stream = [ids["a"], ids["b"], ids["c"], eos, ids["d"], ids["e"], eos, *(ids[c] for c in "fghij"), eos]
    data = prepare_calibration(["abc", "  ", "de", "fghij"], tokenizer, seq_len=4, batch_size=2)
    assert [b.tolist() for b in data.batches] == [[stream[0:4], stream[4:8]], [stream[8:12]]]  # 13th token dropped
    assert data.description == "4 user-supplied texts" and data.batches[0].dtype == torch.long
    one_batch = prepare_calibration(["abc", "de", "fghij"], tokenizer, seq_len=4, batch_size=3)
    assert [b.tolist() for b in one_batch.batches] == [[stream[0:4], stream[4:8], stream[8:12]]]
    kept = prepare_calibration(["abc", "  ", "de", "fghij"], tokenizer, seq_len=4, batch_size=2, max_sequences=2)
    assert [b.tolist() for b in kept.batches] == [[stream[0:4], stream[4:8]]]
    smallest = prepare_calibration(["abc", "de"], tokenizer, seq_len=1, batch_size=1, max_sequences=1, num_samples=1)
    assert [b.tolist() for b in smallest.batches] == [[[ids["a"]]]]
    short = prepare_calibration(["ab"], tokenizer, seq_len=4)  # shorter than one block: one short sequence
    assert [b.tolist() for b in short.batches] == [[[ids["a"], ids["b"], eos]]] and short.seq_len == 3
    first_two = prepare_calibration(["abc", "de", "fghij"], tokenizer, seq_len=4, num_samples=2)
    assert [b.tolist() for b in first_two.batches] == [[stream[0:4]]]
    tokenizer.eos_token = None  # nothing to join with: the texts follow each other
    assert prepare_calibration(["ab", "cd"], tokenizer, seq_len=4).batches[0].tolist() == [
        [ids["a"], ids["b"], ids["c"], ids["d"]]]
    assert prepare_calibration([torch.tensor([5])], seq_len=4).batches[0].tolist() == [[5]]  # a single token


def test_defaults_are_128_sequences_of_256_tokens_in_batches_of_8():
    data = prepare_calibration(torch.arange(300 * 256).remainder(1000).view(300, 256))
    assert data.num_sequences == 128 and data.seq_len == 256 and [b.shape[0] for b in data.batches] == [8] * 16
    assert prepare_calibration(torch.ones(300, 256, dtype=torch.long), num_samples=5).num_sequences == 5
    packed = prepare_calibration([torch.arange(130 * 256).remainder(1000)])
    assert data.num_sequences == 128 and packed.batches[0].tolist() == data.batches[0].tolist()


def test_in_memory_datasets_take_their_name_split_chat_column_and_num_samples(tmp_path, tiny_tokenizer,
                                                                               chat_tokenizer):
    from datasets import DatasetInfo

    named = Dataset.from_dict({"text": ["abc", "de", "fgh"]}, info=DatasetInfo(dataset_name="wiki_sample"))
    data = prepare_calibration(named, tiny_tokenizer, seq_len=2, num_samples=2)
    assert data.description == "wiki_sample (3 rows)"
    assert data.batches[0].tolist() == prepare_calibration(["abc", "de"], tiny_tokenizer, seq_len=2).batches[0].tolist()
    assert prepare_calibration(Dataset.from_dict({"text": ["abc"]}), tiny_tokenizer, seq_len=2).description == (
        "datasets.Dataset (1 rows)")
    messages = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]]
    chats = Dataset.from_dict({"messages": messages, "text": ["unused", "unused"]})
    rendered = prepare_calibration(chats, chat_tokenizer, seq_len=4, chat_template=True, num_samples=1)
    expected = prepare_calibration(chat_tokenizer.apply_chat_template(messages[:1], tokenize=False), chat_tokenizer,
                                   seq_len=4)
    assert [b.tolist() for b in rendered.batches] == [b.tolist() for b in expected.batches]
    DatasetDict({"train": Dataset.from_dict({"text": ["abc"]}),
                 "validation": Dataset.from_dict({"text": ["xyz"]})}).save_to_disk(tmp_path / "saved")
    held = prepare_calibration(str(tmp_path / "saved"), tiny_tokenizer, seq_len=2, split="validation")
    assert held.batches[0].tolist() == prepare_calibration(["xyz"], tiny_tokenizer, seq_len=2).batches[0].tolist()


def test_in_memory_calibration_refusals_say_what_to_pass(tiny_tokenizer):
    refusals = [
        ([], tiny_tokenizer, "The calibration set is empty."),
        (["text"], None, "Calibration texts need a tokenizer: pass tokenizer=... (or load the model from a folder with "
                         "one)."),
        (["  ", "\n"], tiny_tokenizer, "The calibration set is empty: every text is blank."),
        (["text", 3], tiny_tokenizer, "Calibration items must be all strings or all token tensors."),
        ([[{"role": "user", "content": "hi"}]], tiny_tokenizer,
         "Calibration items must be all strings or all token tensors (chat messages need chat_template=True)."),
        ([torch.tensor([], dtype=torch.long), torch.tensor([-1])], None, "Calibration token ids must be >= 0, found -1."),
        (None, tiny_tokenizer, "This method needs calibration data: pass calibration=list of texts, a Dataset or token "
                               "ids."),
        (torch.empty(0, 4, dtype=torch.long), None, "The calibration set is empty: it holds no tokens."),
    ]
    for calibration, tokenizer, message in refusals:
        with pytest.raises(ValueError) as raised:
            prepare_calibration(calibration, tokenizer, seq_len=4)
        assert str(raised.value) == message
    for name, value in (("seq_len", 0), ("batch_size", 1.5), ("max_sequences", True), ("num_samples", -2)):
        with pytest.raises(ValueError) as raised:
            prepare_calibration(["text"], tiny_tokenizer, **{name: value})
        assert str(raised.value) == f"{name} must be a whole number >= 1, got {value!r}."


CHAT_ROW = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
BAD_SOURCES = [  # file name, bytes, keyword arguments, the error after "<path>"
    ("empty.jsonl", b"", {}, ": the file is empty (it has no bytes)."),
    ("blank.txt", b"\n\n  \n", {}, ": the calibration set is empty: every 'text' value is blank."),
    ("cal.docx", b"PK\x03\x04", {}, ": not a data file type datasets can read; use one of .arrow, .csv, "
                                    ".json, .jsonl, .md, .parquet, .text, .tsv, .txt."),
    ("cal.csv", b"body\nsome text\n", {}, ": no 'text' column (columns: ['body']); choose one with text_column=NAME."),
    ("chat.jsonl", CHAT_ROW, {}, ": no 'text' column (columns: ['messages']); chat data: pass chat_template=True, "
                                 "or choose a column with text_column=NAME."),
    ("bad.json", b'[{"text": "a"},', {}, ": datasets could not read it (ValueError: Expected object or value at "
                                        "position 14)."),
    ("nulls.jsonl", b'{"text": "ok"}\n\n{"text": null, "id": 2}\n', {}, ", line 3: no 'text' value (found: ['id'])."),
    ("latin.txt", "first line\ncaf\u00e9 au lait\n".encode("latin-1"), {},
     ", line 2: not UTF-8 text (byte 0xe9 at column 4); calibration text files must be UTF-8."),
    ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {},
     ", line 2: not UTF-8 text (byte 0xe9 at column 14); calibration text files must be UTF-8."),
    ("latin.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n', mtime=0), {},
     ", line 2: not UTF-8 text (byte 0xe9 at column 14); calibration text files must be UTF-8."),
    ("broken.jsonl", b'{"text": "ok"}\n\n{"text": "no end}\n', {},
     ", line 3: malformed JSON (Unterminated string starting at, column 10)."),
    ("lists.jsonl", b'{"text": "ok"}\n{"text": ["a", "b"]}\n', {},
     ", line 2: holds a list, not text (chat messages? pass chat_template=True)."),
    ("numbers.jsonl", b'{"text": "ok"}\n{"text": 7}\n', {}, ", line 2: holds int, not text."),
    ("cal.tsv", b"text\tlabel\nhello\t1\n", {"split": "test"},
     ": a single file has only the 'train' split, not 'test'; drop split=."),
    ("lists.jsonl", b'{"text": ["a"]}\n', {"chat_template": True},
     ": no 'messages' column (columns: ['text']); choose one with text_column=NAME."),
    ("chat.jsonl", CHAT_ROW + b'{"messages": [{"role": "user"}]}\n', {"chat_template": True},
     ", line 2: chat_template=True needs every message to be a {'role', 'content'} mapping."),
    ("chat.jsonl", CHAT_ROW + b'{"messages": []}\n', {"chat_template": True},
     ", line 2: chat_template=True needs a non-empty list of {'role', 'content'} messages per row."),
    ("chat.jsonl", CHAT_ROW + b'{"messages": ["hi"]}\n', {"chat_template": True},
     ", line 2: chat_template=True needs every message to be a {'role', 'content'} mapping."),
]


@pytest.mark.parametrize(("name", "content", "options", "error"), BAD_SOURCES, ids=[case[0] for case in BAD_SOURCES])
def test_bad_local_sources_name_the_file_the_line_and_the_problem(tmp_path, name, content, options, error):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        read_calibration_source(path, **options)
    assert str(raised.value) == f"{path}{error}"


def test_rows_of_an_in_memory_dataset_are_named_by_number(tiny_tokenizer):
    rows = Dataset.from_dict({"text": ["ok", "fine", None], "id": [1, 2, 3]})
    with pytest.raises(ValueError) as raised:
        prepare_calibration(rows, tiny_tokenizer)
    assert str(raised.value) == "datasets.Dataset (3 rows), row 3: no 'text' value (found: ['id'])."


def test_folders_and_empty_sets_that_datasets_cannot_use_are_named(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError) as raised:
        read_calibration_source(folder)
    assert str(raised.value) == (f"{folder / 'a.jsonl'}, line 2: not UTF-8 text (byte 0xe9 at column 14); "
                                 "calibration text files must be UTF-8.")
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["a"]}).save_to_disk(saved)
    (saved / "state.json").write_text("{not json")
    with pytest.raises(ValueError) as raised:
        read_calibration_source(saved)
    assert str(raised.value).startswith(f"{saved}: datasets could not read it (JSONDecodeError: ")
    no_data = tmp_path / "documents"
    no_data.mkdir()
    (no_data / "report.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError) as raised:
        read_calibration_source(no_data)
    assert str(raised.value).startswith(f"{no_data}: datasets could not read it (")
    with pytest.raises(ValueError) as raised:
        prepare_calibration(Dataset.from_dict({"text": []}), seq_len=4)
    assert str(raised.value) == "datasets.Dataset (0 rows): the calibration set is empty (no rows)."


def test_a_tsv_file_is_read_by_tabs(tmp_path):
    path = tmp_path / "cal.tsv"
    path.write_bytes(b"label\ttext\n1\thello, world\n")
    assert read_calibration_source(path) == (["hello, world"], f"{path}, column 'text', 1 rows")


def test_missing_paths_are_never_sent_to_the_hub(tmp_path):
    for name in (str(tmp_path / "gone.jsonl"), "cal.parquet", "./data", "a/b/c", "owner/cal.jsonl.gz"):
        with pytest.raises(ValueError) as raised:
            read_calibration_source(name)
        assert str(raised.value) == (
            f"calibration={name!r} names no file or folder; pass an existing data file (.arrow, .csv, .json, .jsonl, "
            ".md, .parquet, .text, .tsv, .txt), a folder, a saved dataset or a Hub dataset id."
        )


@pytest.fixture
def hub_datasets(local_hub, tmp_path, monkeypatch):
    """The local Hub, as `datasets` in this process sees it (it read its endpoint and offline flag at import)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", local_hub.url)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    local_hub.add_repo_files("me/cal", {
        "data/validation.jsonl": b'{"body": "held"}\n{"body": "out"}\n',
        "data/train.jsonl": b'{"body": "trained"}\n',
    }, repo_type="dataset")
    return local_hub


def test_a_hub_dataset_is_read_by_split_and_column_and_a_missing_one_is_named(hub_datasets):
    assert read_calibration_source("me/cal", text_column="body") == (
        ["trained"], "Hub dataset me/cal, column 'body', 1 rows")
    assert read_calibration_source("me/cal", split="validation", text_column="body", num_samples=1) == (
        ["held"], "Hub dataset me/cal, split validation, column 'body', 1 rows")
    assert ("GET", "/datasets/me/cal/resolve/") in {(m, p[: len("/datasets/me/cal/resolve/")])
                                                     for m, p in hub_datasets.requests}
    hub_datasets.add_repo_files("me/latin", {"data/train.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'},
                                repo_type="dataset")
    with pytest.raises(ValueError) as raised:
        read_calibration_source("me/latin")
    assert str(raised.value) == ("Hub dataset me/latin: the 'text' column is not UTF-8 text (unexpected end of data); "
                                 "calibration text must be UTF-8.")
    with pytest.raises(ValueError) as raised:
        read_calibration_source("me/absent")
    assert str(raised.value).startswith("me/absent: datasets could not read it (DatasetNotFoundError: ")
    with pytest.raises(ValueError) as raised:
        read_calibration_source("me/cal", split="test", text_column="body")
    assert str(raised.value).startswith("me/cal: datasets could not read it (ValueError: ")
    assert 'Unknown split "test"' in str(raised.value)


def test_cli_reads_a_hub_dataset_from_the_local_hub(local_hub, tmp_path, monkeypatch, tiny_tokenizer, sample_texts):
    """`--calibration owner/name --split ...` through datasets' own Hub client, pointed at the server by HF_ENDPOINT."""
    local_hub.add_repo_files("me/cal", {
        "data/validation.jsonl": "".join(json.dumps({"body": t}) + "\n" for t in sample_texts).encode(),
        "data/train.jsonl": b'{"body": "not this split"}\n',
    }, repo_type="dataset")
    build_tiny_model("mixtral").save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hf_moeprune.cli", "prune", "--model", str(tmp_path / "base"), "--experts-per-layer",
         "3", "--calibration", "me/cal", "--split", "validation", "--text-column", "body", "--num-samples", "8",
         "--seq-len", "32", "--no-progress", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert ("GET", "/datasets/me/cal/resolve/") in {(m, p[: len("/datasets/me/cal/resolve/")])
                                                     for m, p in local_hub.requests}
    record = json.loads((out / "config.json").read_text())["moeprune"]["steps"][0]["calibration"]
    expected = prepare_calibration(sample_texts[:8], tiny_tokenizer, seq_len=32).record()
    assert record["description"] == "Hub dataset me/cal, split validation, column 'body', 8 rows"
    assert record["token_sha256"] == expected["token_sha256"] and record["seq_len"] == 32
    assert "calibration:" not in result.stderr  # --no-progress


def test_cli_chat_template_on_an_instruct_tokenizer(tmp_path, chat_tokenizer):
    from hf_moeprune.cli import main

    conversations = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
                     for i in range(12)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"id": i, "messages": c}) + "\n" for i, c in enumerate(conversations)))
    build_tiny_model("mixtral").save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    assert main(["prune", "--model", str(tmp_path / "base"), "--experts-per-layer", "3", "--calibration", str(path),
                 "--chat-template", "--num-samples", "10", "--seq-len", "16", "--output", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "config.json").read_text())["moeprune"]["steps"][0]["calibration"]
    rendered = [chat_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[:10]]
    assert record["token_sha256"] == prepare_calibration(rendered, chat_tokenizer, seq_len=16).sha256()
    assert record["description"] == f"{path}, column 'messages', 10 rows, chat template applied"
