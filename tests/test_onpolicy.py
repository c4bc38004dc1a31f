"""On-policy distillation (pykd.OnPolicy): sampled batches, the loss on them against a float64
reference, accumulation invariance over uneven lengths, exact resume, metrics and errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from distiller_models import VOCAB, Kill, Killed, TinyLM, batches, same_weights
from reference import soft_term
from torch import nn
from torchrun import run_two_processes

import pykd
from pykd.onpolicy import OnPolicyObjective, sample_continuations

EOS, PAD = 1, 0


class TinySeq2Seq(nn.Module):
    """Mean-pooled source plus the decoder token's embedding, a tanh layer and a head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.src = nn.Embedding(VOCAB, width)
        self.tgt = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        mask = attention_mask.unsqueeze(-1).to(self.src.weight.dtype)
        source = (self.src(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        h = torch.tanh(self.mix(self.tgt(decoder_input_ids) + source[:, None]))
        return self.head(h)


def seq2seq_batches(n: int, size: int = 4, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = torch.randint(2, VOCAB, (size, 5), generator=g)
        lengths = torch.randint(2, 6, (size,), generator=g)
        mask = (torch.arange(5) < lengths[:, None]).long()
        tgt = torch.randint(2, VOCAB, (size, 4), generator=g)
        out.append({"input_ids": src * mask, "attention_mask": mask,
                    "decoder_input_ids": torch.cat([torch.full((size, 1), 2), tgt[:, :-1]], 1),
                    "labels": tgt})
    return out


class Steps(pykd.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_step_end(self, distiller, step, metrics):
        self.metrics.append(metrics)


def fixed_sampler(tokens: torch.Tensor):
    def sample(student, inputs, settings):
        assert not student.training  # samples are drawn in eval mode
        return tokens[: next(iter(inputs.values())).shape[0]].clone()
    return sample


@pytest.mark.parametrize("divergence,beta", [("jsd", 0.5), ("jsd", 0.1), ("kl", 0.5)])
def test_causal_loss_on_a_fixed_sampled_batch_matches_float64(divergence, beta):
    # Prompts from labels (ignore_index before the first label), uneven lengths, a sample that
    # stops at EOS in one row: the step's loss is the divergence over the generated tokens only.
    torch.manual_seed(0)
    teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
    ids = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0], [2, 9, 4, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 8, -100, -100, -100],
                           [-100, -100, -100, -100, -100]])
    labels[2, 2] = 4  # row 2: prompt of two tokens
    sampled = torch.tensor([[5, EOS, 7], [3, 4, 6], [EOS, 9, 9]])
    steps = Steps()
    distiller = pykd.Distiller(
        teacher, student, causal_lm=True, divergence=divergence, beta=beta, temperature=2.0,
        on_policy=pykd.OnPolicy(lmbda=1.0, eos_token_id=EOS, sample=fixed_sampler(sampled),
                                max_new_tokens=3),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0), progress=False, callbacks=[steps])
    distiller.fit([{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    # By hand: prompt + generated tokens (through the EOS) as one sequence per row.
    sequences = [[3, 4, 5, EOS], [7, 3, 4, 6], [2, 9, EOS]]
    prompt = [2, 1, 2]
    total, count = 0.0, 0
    t64, s64 = teacher.double(), student.double()
    for seq, p in zip(sequences, prompt):
        x = torch.tensor([seq])
        t, s = t64(x)["logits"][0], s64(x)["logits"][0]
        rows = slice(p - 1, len(seq) - 1)  # the rows that predict a generated token
        total += soft_term(s[rows], t[rows], divergence, 2.0, beta).sum().item()
        count += len(seq) - p
    assert steps.metrics[0]["on_policy"] == 1.0
    # float32 against float64: a JSD of 0.005 keeps ~5 digits
    assert steps.metrics[0]["loss"] == pytest.approx(total / count, rel=1e-4)


def test_seq2seq_sampled_batch_and_metrics():
    torch.manual_seed(1)
    teacher, student = TinySeq2Seq(12), TinySeq2Seq(6)
    sampled = torch.tensor([[4, 5, EOS, 0], [6, EOS, 0, 0], [7, 8, 9, 3], [EOS, 0, 0, 0]])
    data = seq2seq_batches(1)
    steps = Steps()
    distiller = pykd.Distiller(
        teacher, student, divergence="jsd", beta=0.5,
        on_policy=pykd.OnPolicy(lmbda=1.0, eos_token_id=EOS, sample=fixed_sampler(sampled)),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0), progress=False, callbacks=[steps],
        log_every=1)
    distiller.fit(data)
    metrics = steps.metrics[0]
    assert metrics["generated_tokens"] == pytest.approx((3 + 2 + 4 + 1) / 4)
    # The teacher's NLL of the sampled tokens, and the JSD, by hand in float64.
    batch = data[0]
    t64, s64 = teacher.double(), student.double()
    dec = torch.cat([batch["decoder_input_ids"][:, :1], sampled[:, :-1]], 1)
    t = t64(batch["input_ids"], batch["attention_mask"], dec)
    s = s64(batch["input_ids"], batch["attention_mask"], dec)
    lengths = [3, 2, 4, 1]
    keep = torch.arange(4) < torch.tensor(lengths)[:, None]
    nll = -torch.log_softmax(t, -1).gather(-1, sampled[..., None])[..., 0][keep]
    assert metrics["teacher_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    soft = soft_term(s[keep], t[keep], "jsd", 1.0, 0.5)
    assert metrics["loss"] == pytest.approx(soft.mean().item(), rel=1e-5)


def test_builtin_sampler_right_padded_prompts():
    # The built-in sampler writes each row's token after its own last one and stops at EOS.
    calls = []

    def next_logits(inputs):
        calls.append(inputs["input_ids"].clone())
        ids = inputs["input_ids"]
        logits = torch.full((*ids.shape, VOCAB), -1e4)
        nxt = (ids + 1) % VOCAB  # greedy: the next token is the last one plus one
        logits.scatter_(-1, nxt[..., None], 0.0)
        return logits

    prompts = {"input_ids": torch.tensor([[3, 4, 0], [9, 0, 0]]),
               "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    settings = pykd.OnPolicy(temperature=0.0, max_new_tokens=4, eos_token_id=EOS)
    out = sample_continuations(next_logits, prompts, settings, encoder_decoder=False)
    # Row 1: 9 -> 10 -> 0 -> 1 (EOS); row 0: 4 -> 5 -> 6 -> 7 -> 8.
    assert out.tolist() == [[5, 6, 7, 8], [10, 0, EOS, PAD]]
    assert calls[1][0].tolist() == [3, 4, 5] and calls[1][1].tolist() == [9, 10, 0]


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_accumulation_invariance_over_uneven_lengths(kind):
    # Greedy samples of uneven lengths: one batch of 4 or two micro-batches of 2 give the same
    # step (the normaliser counts the generated tokens of the whole step).
    def run(accumulation: int) -> nn.Module:
        torch.manual_seed(4)
        if kind == "causal":
            teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
            data = batches(1, size=4, length=5, seed=2)
            options = {"causal_lm": True}
            settings = pykd.OnPolicy(lmbda=1.0, temperature=0.0, eos_token_id=3,
                                     max_new_tokens=4, prompt_tokens=2)
        else:
            teacher, student = TinySeq2Seq(12), TinySeq2Seq(6)
            data = seq2seq_batches(1)
            options = {}
            settings = pykd.OnPolicy(lmbda=1.0, temperature=0.0, eos_token_id=3,
                                     max_new_tokens=4)
        if accumulation == 2:
            data = [{k: v[:2] for k, v in data[0].items()}, {k: v[2:] for k, v in data[0].items()}]
        distiller = pykd.Distiller(teacher, student, on_policy=settings, divergence="jsd",
                                   accumulation_steps=accumulation, progress=False,
                                   optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **options)
        distiller.fit(data)
        return student

    same_weights(run(1), run(2), rtol=1e-5, atol=1e-6)


def test_resume_is_exact_with_sampling_and_coins(tmp_path):
    # lmbda = 0.5 with temperature-1 samples: killed after step 3 and resumed, the run ends
    # where the uninterrupted one does.
    def make(callbacks=()):
        torch.manual_seed(5)
        teacher, student = TinyLM(width=12, depth=3, dropout=0.2), TinyLM(width=6, dropout=0.2)
        return pykd.Distiller(
            teacher, student, causal_lm=True, divergence="jsd", alpha=0.5,
            on_policy=pykd.OnPolicy(lmbda=0.5, max_new_tokens=3, prompt_tokens=2, seed=7),
            progress=False, lr=0.05, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=1,
            callbacks=list(callbacks))

    data = batches(6, size=3, length=5, seed=9)
    steps = Steps()
    whole = make([steps])
    whole.fit(data, epochs=2)
    coins = [m["on_policy"] for m in steps.metrics]
    assert 0.0 < sum(coins) < len(coins)  # both kinds of steps ran
    killed = make([Kill(3)])
    with pytest.raises(Killed):
        killed.fit(data, epochs=2)
    resumed = make()
    resumed.fit(data, epochs=2, resume_from=tmp_path / "ckpt.pt")
    same_weights(whole.student, resumed.student)


def test_evaluation_scores_the_dataset():
    # Evaluation never samples: it gives the same metrics as a Distiller without on_policy.
    torch.manual_seed(6)
    teacher, student = TinyLM(width=12, depth=3), TinyLM(width=6)
    data = batches(2, seed=4)
    plain = pykd.Distiller(teacher, student, causal_lm=True, progress=False).evaluate(data)
    sampled = pykd.Distiller(teacher, student, causal_lm=True, progress=False,
                             on_policy=pykd.OnPolicy(lmbda=1.0)).evaluate(data)
    assert sampled == pytest.approx(plain)


def test_errors():
    with pytest.raises(ValueError, match="lmbda"):
        pykd.OnPolicy(lmbda=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pykd.OnPolicy(max_new_tokens=0)
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    on = pykd.OnPolicy(lmbda=1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="causal_lm=True or encoder-decoder"):
        pykd.Distiller(teacher, student, on_policy=on, progress=False).fit(batches(1))
    # Refused at the first step even when it is not an on-policy one (lmbda = 0).
    never = pykd.OnPolicy(lmbda=0.0)
    with pytest.raises(ValueError, match="dict batches"):
        pykd.Distiller(teacher, student, on_policy=never, causal_lm=True, progress=False).fit(
            [torch.randint(0, VOCAB, (2, 4))])
    no_prompt = {**batches(1)[0]}
    no_prompt.pop("labels")
    with pytest.raises(ValueError, match="prompt_tokens"):
        pykd.Distiller(teacher, student, on_policy=on, causal_lm=True, progress=False).fit(
            [no_prompt])
    bad = pykd.OnPolicy(lmbda=1.0, prompt_tokens=2, sample=lambda s, i, o: torch.zeros(1, 2))
    with pytest.raises(ValueError, match="integer token ids"):
        pykd.Distiller(teacher, student, on_policy=bad, causal_lm=True, progress=False).fit(
            batches(1))
    assert isinstance(pykd.Distiller(teacher, student, on_policy=on, causal_lm=True,
                                     progress=False).objective, OnPolicyObjective)


def test_hf_generate_matches_the_builtin_sampler_on_right_padded_prompts():
    # hf_generate left-pads the prompts for a decoder-only model's generate; greedy, it must
    # continue each row exactly as pykd's own sampler does from the right-padded prompts.
    transformers = pytest.importorskip("transformers")
    from pykd.onpolicy import hf_generate

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=32, bos_token_id=2, eos_token_id=EOS)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompts = {"input_ids": torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0], [9, 8, 7, 6]]),
               "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])}
    settings = pykd.OnPolicy(temperature=0.0, max_new_tokens=5, eos_token_id=EOS)
    ours = sample_continuations(lambda inputs: model(**inputs).logits, prompts, settings,
                                encoder_decoder=False)
    theirs = hf_generate(model, prompts, settings)
    assert theirs.shape[1] <= 5
    assert theirs.tolist() == ours[:, :theirs.shape[1]].tolist()
    # In a Distiller: a sampled step runs end to end and reports its samples' length.
    teacher = transformers.GPT2LMHeadModel(config)
    steps = Steps()
    distiller = pykd.Distiller(
        teacher, model, causal_lm=True, divergence="jsd", progress=False, log_every=1,
        on_policy=pykd.OnPolicy(lmbda=1.0, max_new_tokens=4, prompt_tokens=2, sample=hf_generate),
        callbacks=[steps])
    distiller.fit([{"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"],
                    "labels": prompts["input_ids"]}])
    assert 1.0 <= steps.metrics[0]["generated_tokens"] <= 4.0


class NoMaskLM(TinyLM):
    """A language model whose forward takes the ids alone (an LSTM's, say)."""

    def forward(self, input_ids):
        return super().forward(input_ids)


def test_models_without_attention_mask():
    # Prompts of one length, no mask anywhere: rows padded after their EOS are ignored.
    torch.manual_seed(7)
    teacher, student = NoMaskLM(width=12, depth=3), NoMaskLM(width=6)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 2]])
    sampled = torch.tensor([[5, EOS, 7], [3, 4, 6]])
    steps = Steps()
    distiller = pykd.Distiller(
        teacher, student, causal_lm=True, divergence="jsd",
        on_policy=pykd.OnPolicy(lmbda=1.0, eos_token_id=EOS, prompt_tokens=2, max_new_tokens=3,
                                sample=fixed_sampler(sampled)),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0), progress=False, callbacks=[steps])
    distiller.fit([{"input_ids": ids, "labels": ids}])
    total, count = 0.0, 0
    for seq in ([3, 4, 5, EOS], [7, 8, 3, 4, 6]):
        x = torch.tensor([seq])
        t, s = teacher.double()(x)["logits"][0], student.double()(x)["logits"][0]
        total += soft_term(s[1:len(seq) - 1], t[1:len(seq) - 1], "jsd", 1.0, 0.5).sum().item()
        count += len(seq) - 2
    assert steps.metrics[0]["loss"] == pytest.approx(total / count, rel=1e-4)
    # The built-in sampler runs such a model too (every row grows, padding after its EOS).
    teacher.float(), student.float()
    builtin = pykd.Distiller(teacher, student, causal_lm=True, progress=False, log_every=1,
                             on_policy=pykd.OnPolicy(lmbda=1.0, prompt_tokens=2,
                                                     max_new_tokens=3, eos_token_id=EOS),
                             callbacks=[steps])
    builtin.fit([{"input_ids": ids, "labels": ids}])
    assert 1.0 <= steps.metrics[-1]["generated_tokens"] <= 3.0


class HeadLM(nn.Module):
    """A causal LM with an ``lm_head`` for the fused head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed, self.lm_head = nn.Embedding(VOCAB, width), nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.lm_head(torch.tanh(self.embed(input_ids)))}


def test_fused_lm_head_gives_the_same_steps():
    # Sampling reads the student's own logits; the loss and the teacher's NLL the fused head's.
    def run(fused: bool) -> tuple[nn.Module, dict[str, float]]:
        torch.manual_seed(8)
        teacher, student = HeadLM(16), HeadLM(8)
        steps = Steps()
        ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        pykd.Distiller(teacher, student, causal_lm=True, fused_lm_head=fused, divergence="jsd",
                       on_policy=pykd.OnPolicy(lmbda=1.0, prompt_tokens=3, max_new_tokens=4,
                                               eos_token_id=EOS),
                       log_every=1, progress=False, callbacks=[steps], lr=0.1).fit([batch] * 2)
        return student, steps.metrics[-1]

    (plain, m_plain), (fused, m_fused) = run(False), run(True)
    same_weights(plain, fused, rtol=1e-5, atol=1e-6)
    for key in ("loss", "teacher_nll", "generated_tokens", "kl"):
        assert m_fused[key] == pytest.approx(m_plain[key], rel=1e-5), key


def test_lmbda_schedule():
    # From the dataset's sequences to the student's own: lmbda 0 at the first step, 1 at the
    # last; a schedule known to leave [0, 1] is refused up front, any other as it runs.
    from pykd.schedules import Linear

    steps = Steps()
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    pykd.Distiller(teacher, student, causal_lm=True, progress=False, callbacks=[steps],
                   on_policy=pykd.OnPolicy(lmbda=Linear(0.0, 1.0, steps=5), prompt_tokens=2,
                                           max_new_tokens=2)).fit(batches(6))
    assert [m["lmbda"] for m in steps.metrics] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert steps.metrics[0]["on_policy"] == 0.0 and steps.metrics[-1]["on_policy"] == 1.0
    with pytest.raises(ValueError, match="lmbda"):
        pykd.OnPolicy(lmbda=Linear(0.0, 2.0, steps=5))
    wild = pykd.Distiller(teacher, student, causal_lm=True, progress=False,
                          on_policy=pykd.OnPolicy(lmbda=lambda step: 2.0, prompt_tokens=2))
    with pytest.raises(ValueError, match="from its schedule at step 0"):
        wild.fit(batches(1))


class GRULM(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Embedding(VOCAB, width), nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.rnn(self.embed(input_ids))[0])}


def test_training_on_own_samples_alone_converges_to_the_teacher():
    # lmbda = 1 and no data targets at all: the student matches the teacher wherever it samples,
    # so its KL from the teacher on the teacher's own samples falls (the loop as a whole; the
    # float64 tests above check what each step computes).
    torch.manual_seed(0)
    teacher, student = GRULM(24), GRULM(24)

    def kl_on_teacher_samples() -> float:
        with torch.no_grad():
            prompts = torch.randint(0, VOCAB, (128, 2), generator=torch.Generator().manual_seed(1))
            tokens = sample_continuations(lambda i: teacher(**i)["logits"], {"input_ids": prompts},
                                          pykd.OnPolicy(max_new_tokens=6), encoder_decoder=False)
            seq = torch.cat([prompts, tokens], 1)
            lt = torch.log_softmax(teacher(seq)["logits"][:, 1:-1], -1)
            ls = torch.log_softmax(student(seq)["logits"][:, 1:-1], -1)
            return (lt.exp() * (lt - ls)).sum(-1).mean().item()

    before = kl_on_teacher_samples()
    ids = torch.randint(0, VOCAB, (16, 8))
    pykd.Distiller(teacher, student, causal_lm=True, divergence="jsd", lr=1e-2, progress=False,
                   on_policy=pykd.OnPolicy(lmbda=1.0, prompt_tokens=2, max_new_tokens=6)
                   ).fit([{"input_ids": ids, "labels": ids}] * 100)
    assert kl_on_teacher_samples() < 0.2 * before


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    import onpolicy_ddp_worker

    out = tmp_path / "ddp.pt"
    run_two_processes(str(Path(onpolicy_ddp_worker.__file__)), str(out), "4",
                      cwd=tempfile.gettempdir(), timeout=180)
    two = torch.load(out, weights_only=True)
    assert two["world_size"] == 2
    one = onpolicy_ddp_worker.train(batch_size=8)
    for key, value in one.student.state_dict().items():
        torch.testing.assert_close(two["student"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_hf_generate_for_encoder_decoders():
    # An encoder-decoder's generate starts from the decoder's start column, which is cut off.
    transformers = pytest.importorskip("transformers")
    from pykd.onpolicy import hf_generate

    torch.manual_seed(2)
    config = transformers.BartConfig(
        vocab_size=20, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=EOS,
        decoder_start_token_id=2, forced_eos_token_id=None)
    student = transformers.BartForConditionalGeneration(config).eval()
    teacher = transformers.BartForConditionalGeneration(config)
    src = torch.randint(3, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src)
    mask[1, 4:] = 0
    inputs = {"input_ids": src, "attention_mask": mask,
              "decoder_input_ids": torch.full((3, 1), 2)}
    settings = pykd.OnPolicy(temperature=0.0, max_new_tokens=5, eos_token_id=EOS)
    ours = sample_continuations(lambda i: student(**i).logits, inputs, settings,
                                encoder_decoder=True)
    theirs = hf_generate(student, inputs, settings)
    assert theirs.tolist() == ours[:, :theirs.shape[1]].tolist()
    labels = torch.randint(3, 20, (3, 4))
    batch = {**inputs, "decoder_input_ids": torch.cat([inputs["decoder_input_ids"],
                                                       labels[:, :-1]], 1), "labels": labels}
    steps = Steps()
    pykd.Distiller(teacher, student, divergence="jsd", progress=False, log_every=1,
                   callbacks=[steps],
                   on_policy=pykd.OnPolicy(lmbda=1.0, max_new_tokens=5, eos_token_id=EOS,
                                           sample=hf_generate)).fit([batch])
    assert 1.0 <= steps.metrics[0]["generated_tokens"] <= 5.0
