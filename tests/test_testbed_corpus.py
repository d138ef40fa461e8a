"""The second testbed corpus (scripts/testbed/build_corpus.py): shipped samples, split, labels, licences."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from hf_moeprune.testbed.data import DOMAINS, Document, read_documents, split_of

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "testbed" / "build_corpus.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_corpus = _load_script()
OUTPUT = build_corpus.DEFAULT_OUTPUT


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[Document]]:
    return {name: read_documents(OUTPUT / f"{name}.jsonl.gz") for name in ("heldout", "calibration")}


def test_shipped_samples_respect_the_stable_split(shipped):
    for name, documents in shipped.items():
        assert documents
        assert all(split_of(d.name) == name for d in documents), name
    assert not {d.name for d in shipped["heldout"]} & {d.name for d in shipped["calibration"]}
    assert not {d.text for d in shipped["heldout"]} & {d.text for d in shipped["calibration"]}


def test_every_domain_is_labelled_and_present_in_both_samples(shipped):
    assert len(DOMAINS) >= 6
    sources = set(build_corpus.PYPI_SOURCES) | {s.domain for s in build_corpus.DEBIAN_SOURCES}
    assert sources == set(DOMAINS)
    for documents in shipped.values():
        assert {d.domain for d in documents} == set(DOMAINS)
        assert all(d.name.startswith(d.domain + "/") and d.topic for d in documents)


def test_every_domain_has_a_licence_record_and_debian_copyright_files(shipped):
    record = json.loads((OUTPUT / build_corpus.LICENCES_FILE).read_text())
    with gzip.open(OUTPUT / build_corpus.COPYRIGHTS_FILE, "rt", encoding="utf-8") as handle:
        copyrights = json.load(handle)
    assert set(record["sources"]) == set(DOMAINS)
    for domain, source in record["sources"].items():
        assert source["licence"] and source["packages"], domain
        for package in source["packages"]:
            assert package["version"], package
            if source["registry"].startswith("debian"):
                text = copyrights[package["name"]]
                assert "licen" in text.lower(), package["name"]
                assert package["copyright_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    sample_words = {
        d: sum(len(x.text.split()) for x in shipped["heldout"] if x.domain == d) for d in record["domains"]
    }
    assert sample_words == record["words"]["heldout"]


def test_word_cap_keeps_a_stable_hash_ordered_prefix():
    documents = [Document(f"d/t/{i}", "word " * (10 + i), "d", "t") for i in range(50)]
    kept = build_corpus.cap_words(documents, 200)
    assert sum(len(d.text.split()) for d in kept) <= 200
    assert kept == build_corpus.cap_words(list(reversed(documents)), 200)
    assert build_corpus.cap_words(documents, None) == documents


def test_rst_cleaning_keeps_prose_and_code_drops_markup():
    rst = (
        "Title\n=====\n\n.. module:: json\n   :synopsis: Encode.\n\n"
        "See :func:`json.dumps` and ``indent``, or `the site <https://json.org>`_.\n\n"
        ".. note::\n   Be careful.\n\nExample::\n\n    >>> x = 1\n"
    )
    text = build_corpus.rst_to_text(rst)
    assert "See json.dumps and indent, or the site." in text
    assert "Be careful." in text and ">>> x = 1" in text and "Example:" in text
    assert "=====" not in text and "synopsis" not in text and "module::" not in text


def test_html_cleaning_keeps_visible_blocks_only():
    html = "<html><head><title>T</title></head><body><script>var x;</script><p>One &amp; two</p><p>Three</p></body>"
    assert build_corpus.html_to_text(html) == "One & two\n\nThree"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_manual_pages_render_to_text(tmp_path):
    page = tmp_path / "demo.1.gz"
    with gzip.open(page, "wb") as handle:
        handle.write(b".TH DEMO 1\n.SH NAME\ndemo \\- show \\fBbold\\fR text\n")
    text = build_corpus.roff_to_text(page)
    assert "demo - show bold text" in text and "\\f" not in text
    include = tmp_path / "other.1.gz"
    with gzip.open(include, "wb") as handle:
        handle.write(b".so man1/demo.1\n")
    assert build_corpus.roff_to_text(include) == ""
