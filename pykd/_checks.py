"""Argument checks that must run in Python: the one Python home of pykd's argument rules.

Each rule's home is the C++ op (``csrc/distill_loss_common.cpp`` and the files of the top-k and
fused linear ops), which raises ``ValueError`` (options, shapes, devices) or ``TypeError``
(dtypes) before any kernel runs, so the functional API just calls the op. Python needs them in
two places where the C++ checks cannot run:

- the fake kernels of ``pykd.ops``: under ``torch.compile`` and on the meta device the C++ op
  never runs, so a bad argument must be refused there, with the C++ message;
- the option checks of the module faces and the Distiller, which run at construction, before any
  tensor exists.

So the functions here repeat the C++ rules in the same order and build the same text (numbers,
shapes and dtypes are formatted as the C++ does); ``tests/ops/test_distill_loss_errors.py`` holds
each rule to it by raising it through the real op and through the fake kernel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd", "mse", "cosine")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def shape_str(shape: Sequence[int]) -> str:
    """Sizes as the C++ ``shape_str`` writes them: ``[4, 6]``."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def num_str(x: float) -> str:
    """A number as the C++ ``num_str`` writes it: printf's %f, trailing zeros trimmed."""
    s = f"{float(x):f}"
    if "." not in s:  # inf, nan
        return s
    s = s.rstrip("0")
    return s + "0" if s.endswith(".") else s


def dtype_str(dtype: torch.dtype) -> str:
    """A dtype by its Python name, as the C++ ``dtype_str`` writes it: ``float32``."""
    return str(dtype).removeprefix("torch.")


def as_number(op: str, what: str, value: object) -> float:
    """``value`` as the float the op's schema takes; TypeError naming ``what`` if it is none."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {what} must be a real number, got {value!r}")
    return float(value)


def as_int(op: str, what: str, value: object) -> int:
    """``value`` as the int the op's schema takes; TypeError naming ``what`` if it is none."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {what} must be an int, got {value!r}")
    return int(value)


def as_options(op: str, divergence: str, temperature: float | torch.Tensor,
               alpha: float | torch.Tensor, beta: float, ignore_index: int, reduction: str,
               soft_index: int | None = None) -> dict[str, object]:
    """The loss options as keyword arguments of the op, converted to its schema's types. A
    tensor ``temperature`` or ``alpha`` goes per row (``row_temperature``, ``row_alpha``), the
    scalar standing in for it being 1 (the value that needs no target)."""
    options: dict[str, object] = dict(
        divergence=divergence, beta=as_number(op, "beta", beta),
        ignore_index=as_int(op, "ignore_index", ignore_index), reduction=reduction,
        soft_index=None if soft_index is None else as_int(op, "soft_index", soft_index),
    )
    for what, value in (("temperature", temperature), ("alpha", alpha)):
        if isinstance(value, torch.Tensor):
            options[what], options[f"row_{what}"] = 1.0, value
        else:
            options[what] = as_number(op, what, value)
    return options


def check_tensors(op: str, **named: torch.Tensor | None) -> None:
    """TypeError naming the first argument that is neither a tensor nor (if optional) None.

    The dispatcher would refuse it too, but with a RuntimeError; only tensors reach the C++ checks.
    """
    for what, x in named.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {what} must be a tensor, got {type(x).__name__}")


def check_loss_options(
    divergence: str, temperature: float, alpha: float, beta: float, reduction: str,
    has_target: bool, *, op: str = "distill_loss",
) -> None:
    """Raise ValueError for loss options outside docs/loss.md; needs no tensor."""
    name = f"{op}: "
    if divergence not in DIVERGENCES:
        raise ValueError(f"{name}divergence must be one of {', '.join(DIVERGENCES)}; got "
                         f"'{divergence}'")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}reduction must be one of {', '.join(REDUCTIONS)}; got "
                         f"'{reduction}'")
    temperature = as_number(op, "temperature", temperature)
    alpha = as_number(op, "alpha", alpha)
    beta = as_number(op, "beta", beta)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}temperature must be finite and > 0, got {num_str(temperature)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"{name}alpha must be in [0, 1], got {num_str(alpha)}")
    if not 0 < beta < 1:
        raise ValueError(f"{name}beta must be in the open interval (0, 1), got {num_str(beta)} "
                         "(at its ends jsd is 0: use divergence kl or reverse_kl)")
    if not has_target and alpha != 1:
        raise ValueError(f"{name}alpha must be 1 when no target is given (there is no hard term "
                         f"to mix), got {num_str(alpha)}")


def check_same_device(op: str, what: str, x: torch.Tensor, like: torch.Tensor,
                      like_what: str = "student") -> None:
    if x.device != like.device:
        raise ValueError(f"{op}: {what} is on {x.device} but {like_what} is on {like.device}")


def check_logits_dtype(op: str, what: str, x: torch.Tensor, like: torch.Tensor,
                       like_what: str = "student") -> None:
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{op}: {what} must be float32, float64, float16 or bfloat16, got "
                        f"{dtype_str(x.dtype)}")
    if x.dtype != like.dtype:
        raise TypeError(f"{op}: {what} dtype {dtype_str(x.dtype)} must match {like_what} dtype "
                        f"{dtype_str(like.dtype)}")
    check_same_device(op, what, x, like, like_what)


def check_logits_shape(op: str, student: torch.Tensor) -> None:
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"{op}: student must be shaped (*, V) with V >= 1, got "
                         f"{shape_str(student.shape)}")


def check_row_inputs(op: str, like: torch.Tensor, lead: Sequence[int],
                     weight: torch.Tensor | None, target: torch.Tensor | None) -> None:
    """weight / target: the leading shape ``lead``, the right dtypes, on ``like``'s device."""
    if weight is not None:
        if tuple(weight.shape) != tuple(lead):
            raise ValueError(f"{op}: weight shape {shape_str(weight.shape)} must be the leading "
                             f"shape {shape_str(lead)}")
        if weight.dtype not in (torch.float32, like.dtype):
            raise TypeError(f"{op}: weight must be float32 or the logits dtype "
                            f"{dtype_str(like.dtype)}, got {dtype_str(weight.dtype)}")
        check_same_device(op, "weight", weight, like)
    if target is not None:
        if tuple(target.shape) != tuple(lead):
            raise ValueError(f"{op}: target shape {shape_str(target.shape)} must be the leading "
                             f"shape {shape_str(lead)}")
        if target.dtype != torch.int64:
            raise TypeError(f"{op}: target must be int64 class indices, got "
                            f"{dtype_str(target.dtype)}")
        check_same_device(op, "target", target, like)


def check_row_options(op: str, like: torch.Tensor, lead: Sequence[int],
                      row_temperature: torch.Tensor | None, row_alpha: torch.Tensor | None,
                      soft_index: int | None, ignore_index: int, classes: int,
                      has_target: bool) -> None:
    """Per-row temperature / alpha: the leading shape, floating, on ``like``'s device (alpha only
    with a target); ``soft_index`` outside [0, V) and not ``ignore_index``."""
    for what, x in (("temperature", row_temperature), ("alpha", row_alpha)):
        if x is None:
            continue
        if tuple(x.shape) != tuple(lead):
            raise ValueError(f"{op}: per-row {what} shape {shape_str(x.shape)} must be the "
                             f"leading shape {shape_str(lead)}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: per-row {what} must be floating point, got "
                            f"{dtype_str(x.dtype)}")
        check_same_device(op, what, x, like)
    if row_alpha is not None and not has_target:
        raise ValueError(f"{op}: a per-row alpha needs a target (there is no hard term to mix)")
    if soft_index is not None:
        if soft_index == ignore_index:
            raise ValueError(f"{op}: soft_index must differ from ignore_index ({ignore_index})")
        if 0 <= soft_index < classes:
            raise ValueError(f"{op}: soft_index {soft_index} is a class in [0, {classes}); use a "
                             "label outside it")


def check_distill_args(student, teacher, weight, target, divergence, temperature, alpha, beta,
                       ignore_index, reduction, row_temperature=None, row_alpha=None,
                       soft_index=None) -> None:
    """The C++ ``check_distill_args`` of ``distill_loss``."""
    op = "distill_loss"
    check_loss_options(divergence, temperature, alpha, beta, reduction, target is not None, op=op)
    check_logits_dtype(op, "student", student, student)
    check_logits_dtype(op, "teacher", teacher, student)
    check_logits_shape(op, student)
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: teacher shape {shape_str(teacher.shape)} must equal student "
                         f"shape {shape_str(student.shape)}")
    check_row_inputs(op, student, student.shape[:-1], weight, target)
    check_row_options(op, student, student.shape[:-1], row_temperature, row_alpha, soft_index,
                      ignore_index, student.shape[-1], target is not None)


def check_topk_options(divergence: str, temperature: float, alpha: float, beta: float,
                       reduction: str, has_target: bool) -> None:
    """The loss options of ``distill_loss_topk``: those of the dense loss, kl or jsd only."""
    op = "distill_loss_topk"
    check_loss_options(divergence, temperature, alpha, beta, reduction, has_target, op=op)
    if divergence not in ("kl", "jsd"):
        raise ValueError(f"{op}: divergence must be kl or jsd with a top-k teacher, got "
                         f"'{divergence}' (reverse KL is infinite off the teacher's top-k)")


def check_topk_args(student, teacher_indices, teacher_logits, weight, target, divergence,
                    temperature, alpha, beta, ignore_index, reduction, row_temperature=None,
                    row_alpha=None, soft_index=None, teacher_log_rest=None) -> None:
    """The C++ ``check_topk_args`` of ``distill_loss_topk``."""
    op = "distill_loss_topk"
    check_topk_options(divergence, temperature, alpha, beta, reduction, target is not None)
    check_logits_dtype(op, "student", student, student)
    check_logits_shape(op, student)
    lead = student.shape[:-1]
    index, logit = teacher_indices, teacher_logits
    if index.dim() != student.dim() or index.shape[:-1] != lead or index.shape[-1] < 1:
        raise ValueError(f"{op}: teacher_indices must be (*, k) with k >= 1 and the student's "
                         f"leading dims, got {shape_str(index.shape)} for student "
                         f"{shape_str(student.shape)}")
    if logit.shape != index.shape:
        raise ValueError(f"{op}: teacher_logits shape {shape_str(logit.shape)} must equal "
                         f"teacher_indices shape {shape_str(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: teacher_indices must be int64 or int32, got "
                        f"{dtype_str(index.dtype)}")
    if not logit.is_floating_point():
        raise TypeError(f"{op}: teacher_logits must be floating point, got "
                        f"{dtype_str(logit.dtype)}")
    check_same_device(op, "teacher_indices", index, student)
    check_same_device(op, "teacher_logits", logit, student)
    check_row_inputs(op, student, lead, weight, target)
    rest = teacher_log_rest
    if rest is not None:
        if divergence != "kl":
            raise ValueError(f"{op}: teacher_log_rest needs divergence kl, got '{divergence}'")
        if rest.shape != lead:
            raise ValueError(f"{op}: teacher_log_rest must have the student's leading shape "
                             f"{shape_str(lead)}, got {shape_str(rest.shape)}")
        if not rest.is_floating_point():
            raise TypeError(f"{op}: teacher_log_rest must be floating point, got "
                            f"{dtype_str(rest.dtype)}")
        check_same_device(op, "teacher_log_rest", rest, student)
    check_row_options(op, student, lead, row_temperature, row_alpha, soft_index, ignore_index,
                      student.shape[-1], target is not None)


def check_fused_linear_options(reduction: str, chunk_size: int) -> None:
    """The options only ``fused_linear_distill_loss`` restricts."""
    op = "fused_linear_distill_loss"
    if reduction == "none":
        raise ValueError(f"{op}: reduction 'none' is not supported; use 'sum' with per-row "
                         "weights")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")


def check_fused_linear_args(student_hidden, student_weight, student_bias, teacher_hidden,
                            teacher_weight, teacher_bias, weight, target, divergence, temperature,
                            alpha, beta, ignore_index, reduction, chunk_size,
                            row_temperature=None, row_alpha=None, soft_index=None) -> None:
    """The C++ ``check_fused_linear_args`` of ``fused_linear_distill_loss``."""
    op = "fused_linear_distill_loss"
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    check_loss_options(divergence, temperature, alpha, beta, reduction, target is not None, op=op)
    check_fused_linear_options(reduction, chunk_size)
    for what, x in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
                    ("teacher_weight", wt)):
        check_logits_dtype(op, what, x, hs, "student_hidden")
    if hs.dim() < 1 or ht.dim() != hs.dim() or ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"{op}: student_hidden (*, Hs) and teacher_hidden (*, Ht) must share "
                         f"the leading dims, got {shape_str(hs.shape)} and {shape_str(ht.shape)}")
    if ws.dim() != 2 or ws.shape[1] != hs.shape[-1] or ws.shape[0] < 1:
        raise ValueError(f"{op}: student_weight must be [V, Hs] with V >= 1 and Hs = "
                         f"{hs.shape[-1]}, got {shape_str(ws.shape)}")
    vocab = ws.shape[0]
    if wt.dim() != 2 or wt.shape[0] != vocab or wt.shape[1] != ht.shape[-1]:
        expected = shape_str((vocab, ht.shape[-1]))
        raise ValueError(f"{op}: teacher_weight must be [V, Ht] = {expected}, got "
                         f"{shape_str(wt.shape)}")
    for what, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is None:
            continue
        check_logits_dtype(op, what, b, hs, "student_hidden")
        if b.dim() != 1 or b.shape[0] != vocab:
            raise ValueError(f"{op}: {what} must be [V] = [{vocab}], got {shape_str(b.shape)}")
    check_row_inputs(op, hs, hs.shape[:-1], weight, target)
    check_row_options(op, hs, hs.shape[:-1], row_temperature, row_alpha, soft_index, ignore_index,
                      vocab, target is not None)
