"""Pure-torch reference of the loss contract in docs/loss.md, written for clarity, not speed.

Evaluated in float64 it is the ground truth for every kernel; evaluated in a low dtype it measures
torch's own error in that dtype, which bounds what a bf16/fp16 kernel may be allowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFTMAX_DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _plogp_ratio(p: torch.Tensor, lp: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """sum p (lp - lo) with 0 log 0 = 0, differentiable without NaN where p = 0."""
    pos = p > 0
    safe = torch.where(pos, lp - lo, torch.zeros_like(lp))
    return torch.where(pos, p * safe, torch.zeros_like(p)).sum(-1)


def soft_term(s: torch.Tensor, t: torch.Tensor, divergence: str,
              temperature: float | torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row soft term for [N, V] rows; ``temperature`` a number or one per row."""
    T = torch.as_tensor(temperature, dtype=s.dtype).reshape(-1, 1)  # [1, 1] or [N, 1]
    T2 = (T * T).reshape(-1)
    if divergence in SOFTMAX_DIVERGENCES:
        lp = F.log_softmax(t / T, dim=-1)
        lq = F.log_softmax(s / T, dim=-1)
        p, q = lp.exp(), lq.exp()
        if divergence == "kl":
            return T2 * _plogp_ratio(p, lp, lq)
        if divergence == "reverse_kl":
            return T2 * _plogp_ratio(q, lq, lp)
        m = beta * p + (1 - beta) * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        return T2 * (beta * _plogp_ratio(p, lp, lm) + (1 - beta) * _plogp_ratio(q, lq, lm))
    if divergence == "mse":
        return ((t - s) ** 2).sum(-1)
    if divergence == "cosine":
        ns = s.norm(dim=-1).clamp_min(1e-8)
        nt = t.norm(dim=-1).clamp_min(1e-8)
        return 1 - (s * t).sum(-1) / (ns * nt)
    raise ValueError(divergence)


def topk_rest_soft(s: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor,
                   log_rest: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Per-row kl soft term against a top-k teacher with its rest mass in one bucket: the KL
    between the (k + 1)-bucket distributions, the student's bucket summed over its own columns
    off the used entries (not 1 - sum over them, as a kernel may compute it). With a rest, an
    unused slot (-inf logit) is a class of the bucket."""
    T = torch.as_tensor(temperature, dtype=s.dtype).reshape(-1, 1)
    lr = log_rest.to(s.dtype).reshape(-1)
    idx = indices.long().reshape(s.shape[0], -1)
    t = logits.to(s.dtype).reshape(idx.shape)
    lq = F.log_softmax(s / T, dim=-1)
    kept = torch.where(lr == float("-inf"), torch.zeros_like(lr), torch.log1p(-lr.exp()))
    lp = F.log_softmax(t / T, dim=-1) + kept[:, None]
    used = ~((t == float("-inf")) & (lr != float("-inf"))[:, None])
    # Off the bucket: the used entries' columns only.
    off = torch.ones_like(lq, dtype=torch.bool).scatter(-1, idx, ~used)
    lq_rest = torch.logsumexp(torch.where(off, lq, torch.full_like(lq, float("-inf"))), dim=-1)
    p_used = torch.where(used, lp.exp(), torch.zeros_like(lp))
    p_all = torch.cat([p_used, lr.exp()[:, None]], dim=-1)
    lp_all = torch.cat([lp, lr[:, None]], dim=-1)
    lq_all = torch.cat([lq.gather(-1, idx), lq_rest[:, None]], dim=-1)
    return (T * T).reshape(-1) * _plogp_ratio(p_all, lp_all, lq_all)


def reference_loss(student, teacher, weight=None, target=None, *, divergence="kl",
                   temperature=1.0, alpha=1.0, beta=0.5, ignore_index=-100, reduction="mean",
                   soft_index=None, dtype=torch.float64, soft_fn=None):
    """The loss of docs/loss.md computed with torch ops in `dtype` (autograd flows through).
    ``temperature`` and ``alpha`` are numbers or per-row tensors of the leading shape.
    ``soft_fn(s, temperature)`` replaces the soft term of the ``[N, V]`` student rows (then
    ``teacher`` is unused)."""
    V = student.shape[-1]
    lead = student.shape[:-1]
    s = student.to(dtype).reshape(-1, V)
    n = s.shape[0]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().to(dtype).reshape(n)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().to(dtype).reshape(n)
    if soft_fn is not None:
        soft = soft_fn(s, temperature)
    else:
        soft = soft_term(s, teacher.to(dtype).reshape(-1, V), divergence, temperature, beta)
    w = weight.to(dtype).reshape(n) if weight is not None else torch.ones(n, dtype=dtype)
    if target is not None:
        y = target.reshape(n)
        valid = y != ignore_index
        soft_only = (y == soft_index) if soft_index is not None else torch.zeros_like(valid)
        labelled = valid & ~soft_only
        y_safe = torch.where(labelled, y, torch.zeros_like(y))
        hard = -F.log_softmax(s, dim=-1).gather(1, y_safe[:, None]).squeeze(1)
        mixed = torch.where(labelled, alpha * soft + (1 - alpha) * hard, soft)
        row = torch.where(valid, mixed, torch.zeros_like(soft))
        w = torch.where(valid, w, torch.zeros_like(w))
        count = valid.sum().to(dtype)
    else:
        row = soft
        count = torch.tensor(float(n), dtype=dtype)
    rows = w * row
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    norm = w.sum() if reduction == "mean" else count
    return torch.where(norm > 0, total / torch.where(norm > 0, norm, 1), torch.zeros_like(total))


def nonfinite_rows(student: torch.Tensor, teacher: torch.Tensor, divergence: str,
                   hard: bool) -> torch.Tensor:
    """Rows whose loss and gradients the contract makes NaN, as a bool mask of the leading shape.

    A softmax (kl, reverse_kl, jsd) or the hard term sees NaN or +inf in a logit it reads; mse and
    cosine see any non-finite feature. -inf in a softmax is a masked entry, not an error.
    """
    def nan_or_pos_inf(x):
        return (torch.isnan(x) | (x == float("inf"))).any(-1)

    if divergence in SOFTMAX_DIVERGENCES:
        bad = nan_or_pos_inf(student) | nan_or_pos_inf(teacher)
    else:
        bad = (~torch.isfinite(student)).any(-1) | (~torch.isfinite(teacher)).any(-1)
    if hard:
        bad = bad | nan_or_pos_inf(student)
    return bad


def logprob_bucket_kl(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Per-row kl soft term over k + 1 buckets straight from an engine's top-k
    log-probabilities at T, in float64: teacher p_j = exp(logprob_j) and rest 1 - sum_j p_j;
    student q = softmax(student / T) on the k ids and 1 - its mass there."""
    lq = torch.log_softmax(student.double() / temperature, -1)
    lp = logprobs.double()
    p = lp.exp()  # 0 on unused (-inf) slots, whose classes belong to the rest
    rest = (1 - p.sum(-1)).clamp_min(0)
    q_k = torch.where(p > 0, lq.gather(-1, ids).exp(), torch.zeros_like(p))
    q_rest = lq.exp().sum(-1) - q_k.sum(-1)
    used = torch.where(p > 0, p * (lp - q_k.log()), torch.zeros_like(p)).sum(-1)
    return temperature**2 * (used + torch.xlogy(rest, rest) - torch.xlogy(rest, q_rest))
