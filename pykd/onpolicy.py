"""On-policy distillation (GKD, Agarwal et al. 2024): the student learns from its own samples.

With probability ``lmbda`` a training step replaces each micro-batch's target sequences by
continuations the student samples itself (without gradients) from the batch's prompts (a causal
LM) or sources (an encoder-decoder); the teacher scores the sampled tokens under teacher forcing
and the loss is the configured divergence (``divergence="jsd"`` with ``beta`` is GKD's
generalised JSD) over the generated positions only, as soft-only rows (no label). The other
steps train on the dataset's sequences as :class:`pykd.Distiller` always does (word-level KD).

Sampling happens in :meth:`OnPolicyObjective.prepare`, before any forward of the step, so the
step's normaliser counts the generated tokens of every micro-batch (and process) and the
gradient does not depend on how the step is split. The coin of a step and the random numbers of
its samples are drawn from ``(seed, step)`` (and the process's rank and the micro-batch), apart
from the training RNG streams: a resumed run samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pykd._batches import (
    IndexedBatch,
    call_model,
    logits_and_hidden,
    routed_inputs,
    split_batch,
    to_device,
)
from pykd.cache import TeacherCache
from pykd.objective import check_alpha, check_alpha_schedule, logit_loss
from pykd.rows import Prepared
from pykd.schedules import ScheduleLike, as_schedule
from pykd.teacher_student import TeacherStudentObjective, outside_training

__all__ = ["OnPolicy", "OnPolicyObjective", "hf_generate", "pick_tokens", "sample_continuations"]

# (student, inputs, settings) -> [B, L] generated token ids; see OnPolicy.sample.
Sampler = Callable[[nn.Module, dict[str, torch.Tensor], "OnPolicy"], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """How a :class:`pykd.Distiller` trains on the student's own samples (``on_policy=``).

    Attributes:
        lmbda: the share of training steps on student samples (GKD's lambda; TRL's ``lmbda``):
            each step is on-policy with this probability, drawn from ``(seed, step)``; 1: all.
            A schedule of the global step works too (``pykd.schedules.Linear(0.0, 1.0,
            steps=...)`` moves from the dataset's sequences to the student's own as it learns).
        max_new_tokens: the most tokens sampled per sequence (an ``eos_token_id`` ends a row
            sooner).
        temperature: the sampling temperature; 0 samples greedily (the argmax).
        eos_token_id: the token that ends a sequence (it is scored, the tokens after it are
            not); None: every row runs to ``max_new_tokens``.
        pad_token_id: what fills the inputs after a row's end.
        prompt_tokens: causal LMs: the first ``prompt_tokens`` tokens of each row are its prompt.
            None: the positions before the row's first label (labels ``ignore_index`` on the
            prompt, as instruction data has them). Encoder-decoders: unused (the encoder's input
            is the prompt, and the first ``decoder_input_ids`` column starts the decoding).
        sample: ``sample(student, inputs, settings) -> [B, L]`` token ids, to sample with the
            model's own generate (a key/value cache; :func:`hf_generate` for Hugging Face
            models). ``inputs`` are the prompts (causal LM: ``input_ids`` and
            ``attention_mask``, right-padded) or the sources and the start column
            (``decoder_input_ids``, one column) with the batch's other inputs; a row may stop
            early (padding after its ``eos_token_id``). It draws from torch's global RNG, which
            pykd seeds for each call and restores after it. None: :func:`sample_continuations`
            (any model; it reruns the whole prefix for every token).
        seed: the seed of the coins and the samples.
    """

    lmbda: ScheduleLike = 0.5
    max_new_tokens: int = 32
    temperature: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    prompt_tokens: int | None = None
    sample: Sampler | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_alpha_schedule(as_schedule(self.lmbda), "OnPolicy.lmbda")  # in [0, 1] as well
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"OnPolicy.max_new_tokens must be an int >= 1, got "
                             f"{self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"OnPolicy.temperature must be >= 0, got {self.temperature!r}")
        if self.prompt_tokens is not None and not (isinstance(self.prompt_tokens, int)
                                                   and self.prompt_tokens >= 1):
            raise ValueError(f"OnPolicy.prompt_tokens must be an int >= 1 or None, got "
                             f"{self.prompt_tokens!r}")

    def share(self, step: int) -> float:
        """``lmbda`` at the global step ``step`` (a schedule can only be checked as it runs)."""
        value = as_schedule(self.lmbda)(step)
        check_alpha(value, "OnPolicy.lmbda", f" from its schedule at step {step}")
        return value

    def coin(self, step: int, share: float) -> bool:
        """Whether the global step ``step``, whose ``lmbda`` is ``share``, trains on student
        samples (the same on every process)."""
        return share >= 1.0 or random.Random(f"{self.seed}:{step}").random() < share


def pick_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row of ``[B, V]`` logits: the argmax at temperature 0, else a sample at
    ``temperature`` (for samplers of one's own, too)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.no_grad()
def sample_continuations(next_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                         inputs: dict[str, torch.Tensor], settings: OnPolicy, *,
                         encoder_decoder: bool) -> torch.Tensor:
    """Sample up to ``settings.max_new_tokens`` tokens per row, token by token.

    ``next_logits(inputs)`` is the model's ``[B, T, V]`` logits on ``inputs``. Encoder-decoder:
    ``inputs["decoder_input_ids"]`` is the start column, grown by each token. Causal LM:
    ``input_ids`` are right-padded prompts (``attention_mask``), each row's token written after
    its own last one. No key/value cache: each token reruns the prefix, which suits the short
    sequences of a CPU; a model with its own generate belongs in ``OnPolicy.sample``.

    Returns:
        ``[B, L]`` token ids, ``L <= max_new_tokens``; a row is ``pad_token_id`` after its
        ``eos_token_id``.
    """
    eos, pad = settings.eos_token_id, settings.pad_token_id
    if encoder_decoder:
        ids = inputs["decoder_input_ids"][:, :1]
        rows = ids.shape[0]
    else:
        prompts = inputs["input_ids"]
        rows, width = prompts.shape
        # Without a mask (a model that takes none) the prompts are of one length, and every
        # row grows by a token per step, padding after its EOS.
        mask = inputs.get("attention_mask")
        lengths = (mask != 0).sum(1) if mask is not None else \
            torch.full((rows,), width, device=prompts.device)
        ids = torch.full((rows, width + settings.max_new_tokens), pad, dtype=prompts.dtype,
                         device=prompts.device)
        ids[:, :width] = prompts.masked_fill(mask == 0, pad) if mask is not None else prompts
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    every = torch.arange(rows, device=ids.device)
    out = []
    for _ in range(settings.max_new_tokens):
        if encoder_decoder:
            logits = next_logits({**inputs, "decoder_input_ids": ids})[:, -1]
        else:
            span = int(lengths.max())
            step = {"input_ids": ids[:, :span]}
            if mask is not None:
                positions = torch.arange(span, device=ids.device)
                step["attention_mask"] = (positions < lengths[:, None]).long()
            logits = next_logits(step)[every, lengths - 1]
        token = pick_tokens(logits, settings.temperature).masked_fill(done, pad)
        out.append(token)
        if encoder_decoder:
            ids = torch.cat([ids, token[:, None]], dim=1)
        else:
            ids[every, lengths] = torch.where(done, ids[every, lengths], token)
            lengths = lengths + (1 if mask is None else (~done).long())
        if eos is not None:
            done = done | (token == eos)
            if bool(done.all()):
                break
    return torch.stack(out, dim=1)


def hf_generate(student: nn.Module, inputs: dict[str, torch.Tensor], settings: OnPolicy
                ) -> torch.Tensor:
    """An ``OnPolicy.sample`` for Hugging Face models: their ``generate`` (with its key/value
    cache). Decoder-only prompts are left-padded for it and the prompt is cut off again."""
    options = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": settings.pad_token_id,
               "eos_token_id": settings.eos_token_id, "do_sample": settings.temperature > 0}
    if settings.temperature > 0:
        options.update(temperature=settings.temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        if "decoder_input_ids" in inputs:
            out = student.generate(**inputs, **options)
            return out[:, 1:]
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        # Left padding: a decoder-only model continues each row from its own last token.
        order = torch.argsort((mask != 0).long(), dim=1, stable=True)
        left_ids, left_mask = ids.gather(1, order), mask.gather(1, order)
        out = student.generate(input_ids=left_ids, attention_mask=left_mask, **options)
        return out[:, ids.shape[1]:]


@dataclasses.dataclass
class Sampled(Prepared):
    """A micro-batch of student samples: its rows are the generated tokens (soft-only)."""

    tokens: torch.Tensor | None = None  # the token each row predicts (ignore_index elsewhere)
    sequences: int = 0


class OnPolicyObjective(TeacherStudentObjective):
    """:class:`pykd.teacher_student.TeacherStudentObjective` with GKD's on-policy steps; see
    the module docstring and :class:`OnPolicy`. Made by :class:`pykd.Distiller` when
    ``on_policy`` is set."""

    checkpoint_format = "pykd.distiller/2"  # the same state: the samples are drawn anew

    def __init__(self, teacher: nn.Module | Any, student: nn.Module, config: Any = None,
                 **options: Any) -> None:
        super().__init__(teacher, student, config, **options)
        settings = self.config.on_policy
        if not isinstance(settings, OnPolicy):
            raise TypeError(f"on_policy must be a pykd.OnPolicy, got {type(settings).__name__}")
        if isinstance(teacher, TeacherCache):
            raise ValueError("on_policy needs a live teacher: a TeacherCache holds no outputs "
                             "on the student's samples")
        self.on_policy = settings
        if self.soft_index is None:  # the sampled rows have no label: the soft term alone
            self.soft_index = -1 if self.ignore_index != -1 else -2
        self._coin, self._step, self._micro, self._share = False, 0, 0, 0.0

    def hyperparameters(self, step: int) -> tuple[float, Any]:
        # Called once per step before the step's prepare calls: the step's coin is kept here.
        self._share = self.on_policy.share(step)
        self._coin, self._step, self._micro = self.on_policy.coin(step, self._share), step, 0
        return super().hyperparameters(step)

    def schedule_metrics(self, hyper: tuple[float, Any]) -> dict[str, float]:
        return {**super().schedule_metrics(hyper), "on_policy": float(self._coin),
                "lmbda": self._share}

    def prepare(self, raw: Any, where: str) -> Prepared:
        if not self.module.training:  # evaluation scores the dataset
            return super().prepare(raw, where)
        # Checked on every training batch, so that a batch unfit for sampling fails at the
        # first step rather than at the first on-policy one.
        if isinstance(raw, IndexedBatch) or not isinstance(raw, Mapping):
            raise ValueError(f"on-policy steps need dict batches (input_ids, ...); {where} is "
                             f"a {type(raw).__name__}")
        if "decoder_input_ids" not in raw and not self.causal_lm:
            raise ValueError(f"on-policy steps need causal_lm=True or encoder-decoder batches "
                             f"(with decoder_input_ids); {where} has neither")
        if not self._coin:
            return super().prepare(raw, where)
        self._micro += 1
        inputs, labels, weight = split_batch(to_device(raw, self.device))
        encoder_decoder = "decoder_input_ids" in inputs
        prompts = inputs if encoder_decoder else self._prompts(inputs, labels, where)
        tokens = self._sample(prompts, encoder_decoder)
        batch, target = self._sampled_batch(inputs, prompts, tokens, encoder_decoder)
        if weight is not None:
            batch["sample_weight"] = weight
        prep = super().prepare(batch, f"{where} (sampled by the student)")
        return Sampled(**{f.name: getattr(prep, f.name) for f in dataclasses.fields(Prepared)},
                       tokens=target, sequences=len(tokens))

    def _prompts(self, inputs: dict[str, Any], labels: torch.Tensor | None, where: str
                 ) -> dict[str, torch.Tensor]:
        """The right-padded prompts of a causal LM batch (``input_ids``, ``attention_mask``)."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"on-policy steps of a causal LM need [B, T] input_ids ({where})")
        mask = inputs.get("attention_mask")
        present = (mask != 0) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        positions = torch.arange(ids.shape[1], device=ids.device)
        if self.on_policy.prompt_tokens is not None:
            prompt = present & (positions < self.on_policy.prompt_tokens)
        else:
            if labels is None:
                raise ValueError(f"on-policy steps without prompt_tokens take each row's prompt "
                                 f"from its labels (ignore_index on the prompt); {where} has none")
            labelled = (labels != self.ignore_index) & present
            first = torch.where(labelled.any(1), labelled.float().argmax(1),
                                present.sum(1)).long()
            prompt = present & (positions < first[:, None])
        if not bool(prompt.any(1).all()):
            raise ValueError(f"every row needs a prompt of at least one token ({where})")
        lengths = prompt.sum(1)
        width = int(lengths.max())
        out = {"input_ids": ids[:, :width].masked_fill(~prompt[:, :width],
                                                       self.on_policy.pad_token_id)}
        if mask is not None:
            out["attention_mask"] = prompt[:, :width].long()
        elif bool((lengths != width).any()):
            raise ValueError(f"prompts of different lengths need an attention_mask in the batch "
                             f"(the model must take one); {where} has none")
        return out

    def _sample(self, prompts: dict[str, Any], encoder_decoder: bool) -> torch.Tensor:
        """The student's samples, drawn in eval mode from a seed of (seed, step, rank,
        micro-batch), outside the training RNG streams."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = random.Random(f"{self.on_policy.seed}:{self._step}:{rank}:{self._micro}"
                             ).getrandbits(63)
        student_inputs = routed_inputs(prompts, self.inputs, "student")
        if encoder_decoder:
            student_inputs = {k: v for k, v in student_inputs.items()
                              if k != "decoder_attention_mask"}
            student_inputs["decoder_input_ids"] = student_inputs["decoder_input_ids"][:, :1]
        with outside_training(self.student, self.device):
            torch.manual_seed(seed)
            if self.on_policy.sample is not None:
                tokens = self.on_policy.sample(self.student, dict(student_inputs),
                                               self.on_policy)
            else:
                tokens = sample_continuations(self._next_logits, dict(student_inputs),
                                              self.on_policy, encoder_decoder=encoder_decoder)
        rows = student_inputs["decoder_input_ids" if encoder_decoder else "input_ids"].shape[0]
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 \
                or tokens.shape[0] != rows or tokens.is_floating_point():
            raise ValueError("OnPolicy.sample must return [B, L] integer token ids, one row per "
                             "sample of the batch")
        return tokens.to(self.device).long()

    def _next_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # The model's own logits, its head included (a fused head is only bypassed in training).
        return logits_and_hidden(call_model(self.student, inputs, {}))[0]

    def _sampled_batch(self, inputs: dict[str, Any], prompts: dict[str, torch.Tensor],
                       tokens: torch.Tensor, encoder_decoder: bool
                       ) -> tuple[dict[str, Any], torch.Tensor]:
        """The training batch of the samples: the tokens as inputs, soft-only labels on the
        generated positions, ``ignore_index`` elsewhere; and the token each position's label
        stands for (``ignore_index`` elsewhere), shifted like the loss rows."""
        pad, ignore, eos = self.on_policy.pad_token_id, self.ignore_index, \
            self.on_policy.eos_token_id
        rows, steps = tokens.shape
        generated = torch.ones_like(tokens, dtype=torch.bool)
        if eos is not None:  # the eos is scored, what follows it is not
            after = torch.cumsum((tokens == eos).long(), dim=1) - (tokens == eos).long()
            generated = after == 0
        if encoder_decoder:
            start = inputs["decoder_input_ids"][:, :1]
            tokens = tokens.masked_fill(~generated, pad)
            batch = {k: v for k, v in inputs.items() if k != "decoder_attention_mask"}
            batch["decoder_input_ids"] = torch.cat([start, tokens[:, :-1]], dim=1)
            if "decoder_attention_mask" in inputs:
                batch["decoder_attention_mask"] = torch.cat(
                    [torch.ones_like(start), generated[:, :-1].long()], dim=1)
            batch["labels"] = torch.full_like(tokens, ignore).masked_fill(generated,
                                                                          self.soft_index)
            return batch, tokens.masked_fill(~generated, ignore)
        prompt_mask = prompts.get("attention_mask")
        lengths = prompt_mask.sum(1) if prompt_mask is not None else \
            torch.full((rows,), prompts["input_ids"].shape[1], device=tokens.device)
        ends = lengths + generated.sum(1)  # generated is a prefix of each row
        width = int(ends.max())
        ids = torch.full((rows, width), pad, dtype=tokens.dtype, device=tokens.device)
        ids[:, :prompts["input_ids"].shape[1]] = prompts["input_ids"]
        slots = lengths[:, None] + torch.arange(steps, device=tokens.device)
        row_ids = torch.arange(rows, device=tokens.device)[:, None].expand_as(slots)
        truth = torch.full_like(ids, ignore)  # each generated token at its position
        truth[row_ids[generated], slots[generated]] = tokens[generated]
        ids = torch.where(truth != ignore, truth, ids)
        labels = torch.full_like(ids, ignore).masked_fill(truth != ignore, self.soft_index)
        mask = torch.arange(width, device=ids.device) < ends[:, None]
        batch = {k: v for k, v in inputs.items() if not (isinstance(v, torch.Tensor)
                                                         and v.dim() >= 2)}
        batch.update(input_ids=ids, labels=labels)
        if prompt_mask is not None:  # else padding after an EOS is only ever ignored
            batch["attention_mask"] = mask.long()
        # Row t predicts the token at t + 1, as the loss rows are shifted.
        return batch, torch.cat([truth[:, 1:], truth.new_full((rows, 1), ignore)], dim=1)

    # ------------------------------------------------------------------------------ metrics

    def zero_stats(self) -> torch.Tensor:
        # Three sums more: generated tokens, sampled sequences, the teacher's NLL of the tokens.
        return torch.cat([super().zero_stats(), torch.zeros(3, dtype=torch.float64,
                                                            device=self.device)])

    @torch.no_grad()
    def stats(self, rows: Any, prep: Prepared, hyper: tuple[float, Any]) -> torch.Tensor:
        sums = super().stats(rows, prep, hyper)
        extra = torch.zeros(3, dtype=torch.float64, device=self.device)
        if isinstance(prep, Sampled) and not rows.teacherless:
            counted = prep.valid & (prep.tokens != self.ignore_index)
            # The teacher's cross entropy on the sampled tokens: the op with alpha = 0.
            nll = logit_loss(rows.teacher, rows.teacher, weight=counted.float(),
                             target=prep.tokens, divergence="kl", temperature=1.0, alpha=0.0,
                             beta=self.beta, ignore_index=self.ignore_index,
                             chunk_size=self.chunk_size)
            extra = torch.stack([counted.sum().double(), extra.new_tensor(prep.sequences),
                                 nll.double()])
        return torch.cat([sums, extra])

    def summary(self, sums: torch.Tensor, hyper: tuple[float, Any],
                has_labels: bool) -> dict[str, float]:
        sums = sums.cpu()
        out = super().summary(sums[:-3], hyper, has_labels)
        tokens, sequences, nll = sums[-3:].tolist()
        if sequences > 0:
            out["generated_tokens"] = tokens / sequences
            if tokens > 0:
                out["teacher_nll"] = nll / tokens
        return dict(sorted(out.items()))
