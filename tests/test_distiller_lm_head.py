"""Distiller(fused_lm_head=True): the same training as the plain Distiller, without the logits."""

from __future__ import annotations

import pytest
import torch
from distiller_models import VOCAB, TinyLM, token_batch
from torch import nn

import pykd


class CountingLinear(nn.Linear):
    """A head that counts the times it really computes logits."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingLinear.calls += 1
        return super().forward(x)


class CausalLM(nn.Module):
    """Embedding, a tanh block, a final LayerNorm and an ``lm_head`` (optionally tied)."""

    def __init__(self, width: int, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.block = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.lm_head = CountingLinear(width, VOCAB, bias=not tie)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        h0 = self.embed(input_ids)
        h1 = torch.tanh(self.block(h0))
        return {"logits": self.lm_head(self.norm(h1)), "hidden_states": (h0, h1)}


def lm_batches(n: int, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    data = [token_batch(3, 7, generator, min_length=3) for _ in range(n)]
    for b in data:  # causal LM: the labels are the inputs, -100 on padding
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return data


class Record(pykd.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, distiller, step, metrics):
        self.losses.append(metrics["loss"])


def train(fused: bool, *, tie: bool = False, hidden: bool = False, **options):
    torch.manual_seed(0)
    teacher, student = CausalLM(12), CausalLM(6, tie=tie)
    if hidden:
        options["hidden"] = pykd.HiddenMatch({1: 1}, weight=0.3, student_width=6,
                                             teacher_width=12)
    record = Record()
    distiller = pykd.Distiller(
        teacher, student, fused_lm_head=fused, lm_head_chunk_size=4, causal_lm=True,
        temperature=2.0, alpha=0.6, accumulation_steps=2, log_every=1, callbacks=[record],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5), progress=False, **options,
    )
    data = lm_batches(6)
    CountingLinear.calls = 0
    distiller.fit(data, epochs=1)
    metrics = distiller.evaluate(data)
    return distiller, record.losses, metrics, CountingLinear.calls


@pytest.mark.parametrize("variant", ["plain", "tied+hidden", "bf16"])
def test_fused_head_trains_like_the_plain_distiller(variant):
    """Causal LM, -100 padding, accumulation: same losses, weights and metrics, and no head ever
    computes logits in the fused run."""
    options = {"tie": variant == "tied+hidden", "hidden": variant == "tied+hidden"}
    if variant == "bf16":
        options["precision"] = "bf16"
    plain, plain_losses, plain_metrics, plain_calls = train(False, **options)
    fused, fused_losses, fused_metrics, fused_calls = train(True, **options)
    assert plain_calls > 0 and fused_calls == 0
    tol = {"rtol": 2e-2, "atol": 2e-2} if variant == "bf16" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), **tol)
    for (name, a), b in zip(fused.student.state_dict().items(),
                            plain.student.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, **tol)
    assert fused_metrics.keys() == plain_metrics.keys()
    for key, value in plain_metrics.items():
        assert fused_metrics[key] == pytest.approx(value, rel=tol["rtol"], abs=tol["atol"]), key
    # The head is itself again outside the Distiller.
    out = fused.student(lm_batches(1)[0]["input_ids"])["logits"]
    assert out.shape[-1] == VOCAB and out.stride()[-1] == 1 and CountingLinear.calls == 1


def test_fused_head_evaluates_like_the_op_on_the_logits():
    teacher, student = CausalLM(12), CausalLM(6)
    (b,) = lm_batches(1)
    metrics = pykd.Distiller(teacher, student, fused_lm_head=True, causal_lm=True, alpha=0.5,
                             temperature=3.0, progress=False).evaluate([b])
    with torch.no_grad():
        s = student(b["input_ids"])["logits"]
        t = teacher(b["input_ids"])["logits"]
    expected = pykd.distillation_loss(s[:, :-1], t[:, :-1], target=b["labels"][:, 1:],
                                      alpha=0.5, temperature=3.0)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


class Capped(CausalLM):
    """Post-processes its logits, so they are not the head's output."""

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        out["logits"] = 5.0 * torch.tanh(out["logits"] / 5.0)
        return out


def test_fused_head_refuses_what_it_cannot_compute():
    batches = lm_batches(1)
    with pytest.raises(ValueError, match="unchanged"):
        pykd.Distiller(Capped(12), CausalLM(6), fused_lm_head=True,
                       progress=False).fit(batches, epochs=1)
    with pytest.raises(ValueError, match="one teacher"):
        pykd.Distiller([CausalLM(12), CausalLM(8)], CausalLM(6), fused_lm_head=True)
    with pytest.raises(ValueError, match="sample_weighting"):
        pykd.Distiller(CausalLM(12), CausalLM(6), fused_lm_head=True,
                       sample_weighting="confidence")
    with pytest.raises(ValueError, match="no submodule 'lm_head'"):
        pykd.Distiller(TinyLM(12), TinyLM(6), fused_lm_head=True)
    with pytest.raises(TypeError, match="nn.Linear"):
        pykd.Distiller(CausalLM(12), CausalLM(6), fused_lm_head=True, teacher_head="norm")
    # TinyLM calls its head "head": named, or found by a function.
    pykd.Distiller(TinyLM(12), TinyLM(6), fused_lm_head=True, student_head="head",
                   teacher_head=lambda model: model.head, progress=False).fit(batches, epochs=1)
