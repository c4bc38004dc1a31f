"""One rule for the loss rows: Distiller, MutualDistiller and the Hugging Face
DistillationTrainer score the same rows of the same causal-LM batch (pykd.rows.loss_rows)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pykd  # noqa: E402
from pykd._batches import parse_batch  # noqa: E402
from pykd.integrations.hf import DistillationTrainer  # noqa: E402
from pykd.rows import loss_rows  # noqa: E402

VOCAB, SEQ = 40, 7


def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A fresh teacher and student, the same every call (each trainer freezes its teacher)."""
    return gpt2(32, 0), gpt2(16, 1)


def gpt2(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=hidden, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def padded_batch(labelled: bool) -> dict[str, torch.Tensor]:
    """Left-padded rows (where the last pad's shifted label is the first real token) and
    right-padded ones (whose last real token has no next token to predict)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    t = torch.arange(SEQ)
    mask = torch.stack([t >= 2, t >= 4, t < 5, t < SEQ]).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if labelled:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def expected_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position t predicts token t + 1: it counts where both are real tokens."""
    mask = batch["attention_mask"].bool()
    return torch.cat([mask[:, :-1] & mask[:, 1:], torch.zeros(len(mask), 1, dtype=torch.bool)],
                     dim=1)


def distiller_loss(batch) -> float:
    teacher, student = pair()
    distiller = pykd.Distiller(teacher, student, causal_lm=True, temperature=2.0, alpha=0.5,
                               progress=False)
    return distiller.evaluate([batch])["loss"]


def trainer_loss(batch, tmp_path) -> float:
    teacher, student = pair()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          disable_tqdm=True, save_strategy="no")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0,
                                  alpha=0.5, args=args)
    assert trainer.causal_lm
    with torch.no_grad():
        return trainer.compute_loss(student, dict(batch)).item()


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no-labels"])
def test_the_rows_follow_one_rule(labelled):
    batch = padded_batch(labelled)
    target, valid = loss_rows(parse_batch(batch), token_logits=True, causal_lm=True)
    assert torch.equal(valid, expected_rows(batch))
    if labelled:
        assert torch.equal(target[valid], batch["labels"][:, 1:][valid[:, :-1]])
    else:
        assert target is None


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no-labels"])
def test_distiller_trainer_and_mutual_give_the_same_loss(tmp_path, labelled):
    teacher, student = pair()
    batch = padded_batch(labelled)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    rows = expected_rows(batch)
    labels = batch["labels"][:, 1:][rows[:, :-1]] if labelled else None
    expected = pykd.distillation_loss(s[rows], t[rows], target=labels, temperature=2.0,
                                      alpha=0.5 if labelled else 1.0).item()

    assert distiller_loss(batch) == pytest.approx(expected, rel=1e-5)
    assert trainer_loss(batch, tmp_path) == pytest.approx(expected, rel=1e-5)
    if labelled:
        # Model 1 of a mutual pair learns from model 0 as a Distiller student from its teacher.
        mutual = pykd.MutualDistiller(list(pair()), alpha=[0.5, 0.5], causal_lm=True,
                                      temperature=2.0, progress=False)
        assert mutual.evaluate([batch])["loss/1"] == pytest.approx(expected, rel=1e-5)
    else:
        with pytest.raises(ValueError, match="needs labels"):
            pykd.MutualDistiller(list(pair()), causal_lm=True,
                                 progress=False).evaluate([batch])
