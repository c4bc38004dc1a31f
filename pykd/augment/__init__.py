"""Data augmentation on token ids, to build a transfer set for distillation.

Distillation pays off when the student sees the teacher's soft labels on many more inputs than
are labelled. Tang et al., 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks", arXiv:1903.12136, section 3.3) build such a *transfer set* by perturbing the training
sentences with three rules:

- **masking**: a word becomes the mask token with probability ``p_mask``;
- **word replacement**: a word becomes another word with probability ``p_replace``. The paper
  draws a word of the same part of speech; pykd has no tagger, so it draws from the corpus's
  unigram distribution (:func:`unigram_counts`, the default), or, with :func:`context_vocab`,
  from the words seen after the same left neighbour in the corpus (a cheap stand-in for "same
  part of speech": after "the" come nouns and adjectives, after "was" adjectives and verbs);
- **n-gram sampling**: with probability ``p_ngram`` the example is cut down to a random n-gram
  of it, ``n`` uniform in ``ngram_range`` (``[1, 5]`` in the paper).

As in the paper, one uniform draw per position decides between masking (``u < p_mask``),
replacement (``p_mask <= u < p_mask + p_replace``) and nothing, so the two rules are mutually
exclusive, and the n-gram is sampled from the result. :func:`transfer_set` repeats this ``copies``
times per example (20 in the paper) and drops duplicates.

Everything works on **token ids** from any tokenizer, so a "word" here is a token (a word piece
for a subword tokenizer). Conventions shared by all functions:

- ``special_ids`` (CLS, SEP, PAD, ...) are never masked, replaced, drawn as a replacement or cut
  off: an n-gram sample keeps every special token where it was (``[CLS] a b c [SEP]`` ->
  ``[CLS] b c [SEP]``), and the n-gram is a window over the other tokens (for a sentence pair it
  may straddle the middle ``[SEP]``, which stays). The paper's alternation for sentence pairs
  (augment the first sentence, the second, then both) is not done here: a whole sequence is
  augmented.
- Lengths: unpadded input gives unpadded output (a ``list[int]`` or a 1-d tensor gives the same
  kind back; a list of sequences gives a ``list[list[int]]``), and n-gram sampling makes a
  sequence shorter. Padded input (a 2-d tensor with
  an ``attention_mask`` or a ``pad_id``) gives output of the same width: padding stays padding,
  shortened rows are padded back with ``pad_id`` on the side the input pads on, and a new
  attention mask comes with them.
- Randomness comes only from ``seed``: an int (a fresh ``torch.Generator`` seeded with it, so the
  same int gives the same output), a CPU ``torch.Generator`` (used and advanced), or None (a
  generator seeded from the OS, not reproducible). The global RNG is never used. The work runs
  on the CPU; tensors come back on the device they came from.

Example:
    >>> from pykd.augment import augment, transfer_set
    >>> CLS, SEP, MASK = 101, 102, 103
    >>> ids = [CLS, 7, 8, 9, 10, 11, SEP]
    >>> augment(ids, p_mask=0.5, p_replace=0.0, p_ngram=0.0, mask_id=MASK,
    ...         special_ids=[CLS, SEP], seed=1)
    [101, 103, 103, 9, 103, 11, 102]
    >>> out = transfer_set([ids, [CLS, 5, 6, SEP]], copies=3, p_mask=0.2, p_replace=0.2,
    ...                    p_ngram=0.5, mask_id=MASK, special_ids=[CLS, SEP], seed=0)
    >>> for seq, source in zip(out.ids, out.sources.tolist()):
    ...     print(source, seq)
    0 [101, 7, 103, 103, 9, 11, 102]
    0 [101, 7, 8, 5, 10, 103, 102]
    0 [101, 9, 102]
    1 [101, 6, 102]
    1 [101, 8, 9, 102]
    1 [101, 9, 6, 102]
"""

from __future__ import annotations

import torch  # noqa: F401  (the examples of the functions below, run in this module, use it)

from pykd.augment._args import IdsLike as IdsLike  # type aliases, as before the split
from pykd.augment._args import SeedLike as SeedLike
from pykd.augment._single import augment, mask_tokens, replace_tokens, sample_ngram
from pykd.augment._transfer import TransferSet, augment_batch, transfer_set
from pykd.augment._vocab import ContextVocab, context_vocab, unigram_counts
from pykd.augment._vocab import VocabLike as VocabLike

__all__ = [
    "ContextVocab",
    "TransferSet",
    "augment",
    "augment_batch",
    "context_vocab",
    "mask_tokens",
    "replace_tokens",
    "sample_ngram",
    "transfer_set",
    "unigram_counts",
]

# The public names live here (help, reprs, pickles, and the docstring examples, which doctest
# then finds and runs in this module, as it did when pykd.augment was one file).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
