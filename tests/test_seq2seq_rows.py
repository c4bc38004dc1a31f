"""Encoder-decoder batches: the loss rows are the decoder's positions, named by its mask.

Before, rows without labels came from the encoder's ``attention_mask``: ``fit`` failed with a
shape error when the two lengths differed, and silently scored the wrong positions when they
matched (the teacher cache too).
"""

from __future__ import annotations

import torch

import pykd
from pykd._batches import parse_batch, token_positions

VOCAB = 11


class TinySeq2Seq(torch.nn.Module):
    """Logits for each decoder position from the decoder tokens and the mean encoder state."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.out = torch.nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        source = (self.embed(input_ids) * attention_mask[..., None]).mean(1, keepdim=True)
        return self.out(self.embed(decoder_input_ids) + source)


def _batch(source_len: int, target_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(source_len * 10 + target_len)
    src = torch.randint(1, VOCAB, (3, source_len), generator=g)
    tgt = torch.randint(1, VOCAB, (3, target_len), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[0, -2:] = 0
    tgt_mask = torch.ones_like(tgt)
    tgt_mask[1, -1:] = 0
    tgt_mask[2, -3:] = 0
    return {"input_ids": src, "attention_mask": src_mask, "decoder_input_ids": tgt,
            "decoder_attention_mask": tgt_mask}


def test_rows_are_the_decoder_positions_whatever_the_lengths():
    for source_len, target_len in ((7, 4), (5, 5)):
        batch = _batch(source_len, target_len)
        rows = token_positions(parse_batch(batch))
        assert torch.equal(rows, batch["decoder_attention_mask"].bool())


def test_without_a_decoder_mask_every_decoder_position_counts():
    batch = _batch(6, 4)
    del batch["decoder_attention_mask"]
    assert torch.equal(token_positions(parse_batch(batch)), torch.ones(3, 4, dtype=torch.bool))


def test_fit_without_labels_scores_the_decoder_rows():
    batch = _batch(7, 4)
    distiller = pykd.Distiller(TinySeq2Seq(16, 0), TinySeq2Seq(8, 1), temperature=2.0,
                               progress=False)
    distiller.fit([batch], epochs=1)
    student = distiller.student
    with torch.no_grad():
        s, t = student(**batch), distiller.teachers[0](**batch)
    rows = batch["decoder_attention_mask"].bool()
    expected = pykd.distillation_loss(s[rows], t[rows], temperature=2.0)
    metrics = distiller.evaluate([batch])
    assert abs(metrics["soft"] - expected.item()) < 1e-5


def test_teacher_cache_stores_the_decoder_rows(tmp_path):
    batch = _batch(5, 5)  # as long as the source: the old rule picked the encoder's rows

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items()}

    teacher = TinySeq2Seq(16, 0).eval()
    cache = pykd.TeacherCache.build(tmp_path / "cache", teacher, Rows(), batch_size=3,
                                    dtype="float32")
    assert cache.token_level
    with torch.no_grad():
        full = teacher(**batch)
    rows = batch["decoder_attention_mask"].bool()
    values, _ = cache.lookup(torch.arange(3), positions=rows)
    torch.testing.assert_close(values[rows], full[rows])
    assert torch.all(values[~rows] == 0)
