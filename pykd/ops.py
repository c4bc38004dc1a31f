"""torch.library glue for the compiled ops: fake (meta) kernels and autograd.

``torch.ops.pykd.distill_loss`` is a composite (C++) that calls ``_distill_loss_fused`` with a
``grad_mask`` naming the inputs that need a gradient; the fused kernel returns those gradients,
computed in the same pass as the loss for d(loss) = 1. The first backward only rescales them by the
incoming gradient, in place, and skips even that when it is exactly 1 (the usual
``loss.backward()``), so the gradient costs no memory or pass beyond the forward's.

``fused_linear_distill_loss`` and ``distill_loss_topk`` follow the same pattern (a composite over
an internal op that returns its gradients); their gradients are small or rarely rescaled, so
their backward scales out of place.
"""

from __future__ import annotations

from typing import Any

import torch

_FUSED = "pykd::_distill_loss_fused"
_SCALE = "pykd::_scale_grad_"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(_FUSED)
def _distill_loss_fused_fake(
    student, teacher, weight, target, divergence, temperature, alpha, beta, ignore_index,
    reduction, grad_mask,
):
    acc = _acc_dtype(student.dtype)
    lead = student.shape[:-1]
    loss = student.new_empty(lead if reduction == "none" else (), dtype=acc)
    grad_s = student.new_empty(student.shape if grad_mask[0] else (0,))
    grad_t = teacher.new_empty(teacher.shape if grad_mask[1] else (0,))
    if weight is not None:
        grad_w = weight.new_empty(weight.shape if grad_mask[2] else (0,))
    else:
        grad_w = student.new_empty((0,), dtype=acc)
    return loss, grad_s, grad_t, grad_w


@torch.library.register_fake(_SCALE)
def _scale_grad_fake(grad, scale):
    return None


def _scaled(grad: torch.Tensor, d_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """grad (*, V) times d_loss ([] or (*))."""
    if in_place:
        torch.ops.pykd._scale_grad_(grad, d_loss)
        return grad
    scale = d_loss if d_loss.dim() == 0 else d_loss.unsqueeze(-1)
    return (grad * scale).to(grad.dtype)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    student, teacher, weight, target = inputs[:4]
    _, grad_s, grad_t, grad_w = output
    # The inputs cost nothing extra to keep (the caller holds them for the step anyway) and let a
    # second backward through the same graph recompute instead of reusing a handed-out buffer.
    ctx.save_for_backward(student, teacher, weight, target, grad_s, grad_t, grad_w)
    # The gradient outputs are not differentiable; without this autograd would also materialise
    # [N, V] zero tensors as their incoming gradients on every backward.
    ctx.mark_non_differentiable(grad_s, grad_t, grad_w)
    ctx.set_materialize_grads(False)
    ctx.options = tuple(inputs[4:10])
    ctx.grad_mask = tuple(inputs[10])
    ctx.first_backward = True


def _backward(ctx: Any, d_loss: torch.Tensor | None, *_unused: Any) -> tuple:
    if d_loss is None:  # grads are not materialised: nothing flows back into the loss
        return (None,) * 11
    for i, name in enumerate(("student", "teacher", "weight")):
        if ctx.needs_input_grad[i] and not ctx.grad_mask[i]:
            raise RuntimeError(
                f"pykd._distill_loss_fused: {name} needs a gradient but grad_mask[{i}] was False; "
                "call torch.ops.pykd.distill_loss, which sets the mask from requires_grad."
            )
    if ctx.first_backward:
        # Unpacked once: scaling the buffers in place bumps their version counters.
        student, teacher, weight, target, grad_s, grad_t, grad_w = ctx.saved_tensors
        ctx.recompute_inputs = (student, teacher, weight, target)
        ctx.first_backward = False
    else:
        # The forward's buffers were scaled in place and handed out by the first backward
        # (retain_graph=True, gradcheck): make fresh ones rather than touch them again.
        student, teacher, weight, target = ctx.recompute_inputs
        _, grad_s, grad_t, grad_w = torch.ops.pykd._distill_loss_fused(
            student.detach(), teacher.detach(), None if weight is None else weight.detach(),
            target, *ctx.options, list(ctx.grad_mask),
        )
    # Plain eager tensors take the zero-copy path (in place, skipped when d_loss == 1). Under
    # torch.compile's tracing (functional tensor subclasses) the functional form lets the compiler
    # fuse and re-use buffers itself.
    in_place = type(d_loss) is torch.Tensor
    out_s = out_t = out_w = None
    if ctx.grad_mask[0] and ctx.needs_input_grad[0]:
        out_s = _scaled(grad_s, d_loss, in_place)
    if ctx.grad_mask[1] and ctx.needs_input_grad[1]:
        out_t = _scaled(grad_t, d_loss, in_place)
    if ctx.grad_mask[2] and ctx.needs_input_grad[2]:
        out_w = (grad_w * d_loss).to(grad_w.dtype)
    return (out_s, out_t, out_w) + (None,) * 8


torch.library.register_autograd(_FUSED, _backward, setup_context=_setup_context)


_FUSED_LINEAR = "pykd::_fused_linear_distill_loss"


@torch.library.register_fake(_FUSED_LINEAR)
def _fused_linear_fake(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    weight, target, divergence, temperature, alpha, beta, ignore_index, reduction, chunk_size,
    grad_mask,
):
    acc = _acc_dtype(student_hidden.dtype)
    loss = student_hidden.new_empty((), dtype=acc)
    grad_h = student_hidden.new_empty(student_hidden.shape if grad_mask[0] else (0,))
    grad_w_head = student_weight.new_empty(student_weight.shape if grad_mask[1] else (0,))
    bias_like = student_bias if student_bias is not None else student_hidden
    want_bias = grad_mask[2] and student_bias is not None
    grad_b = bias_like.new_empty(bias_like.shape if want_bias else (0,))
    if weight is not None:
        grad_w = weight.new_empty(weight.shape if grad_mask[3] else (0,))
    else:
        grad_w = student_hidden.new_empty((0,), dtype=acc)
    return loss, grad_h, grad_w_head, grad_b, grad_w


def _fused_linear_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    grads = output[1:]
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    # Inputs in the order of the schema's differentiable ones: hidden, head weight, bias, weight.
    ctx.grad_inputs = (0, 1, 2, 6)
    ctx.grad_mask = tuple(inputs[15])


def _fused_linear_backward(ctx: Any, d_loss: torch.Tensor | None, *_unused: Any) -> tuple:
    out: list = [None] * 16
    if d_loss is None:
        return tuple(out)
    # The gradients are parameter- and hidden-sized (never [N, V]): scaling them is cheap, and
    # out of place, so a second backward through the same graph sees them untouched.
    for grad, index, wanted in zip(ctx.saved_tensors, ctx.grad_inputs, ctx.grad_mask):
        if ctx.needs_input_grad[index]:
            if not wanted:
                raise RuntimeError(
                    "pykd._fused_linear_distill_loss: an input needs a gradient that grad_mask "
                    "did not ask for; call torch.ops.pykd.fused_linear_distill_loss instead."
                )
            out[index] = (grad * d_loss).to(grad.dtype)
    return tuple(out)


torch.library.register_autograd(
    _FUSED_LINEAR, _fused_linear_backward, setup_context=_fused_linear_setup_context
)


_TOPK = "pykd::_distill_loss_topk_fused"


@torch.library.register_fake(_TOPK)
def _topk_fake(student, teacher_indices, teacher_logits, weight, target, divergence, temperature,
               alpha, beta, ignore_index, reduction, grad_mask):
    acc = _acc_dtype(student.dtype)
    lead = student.shape[:-1]
    loss = student.new_empty(lead if reduction == "none" else (), dtype=acc)
    grad_s = student.new_empty(student.shape if grad_mask[0] else (0,))
    if weight is not None:
        grad_w = weight.new_empty(weight.shape if grad_mask[1] else (0,))
    else:
        grad_w = student.new_empty((0,), dtype=acc)
    return loss, grad_s, grad_w


def _topk_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, grad_s, grad_w = output
    ctx.save_for_backward(grad_s, grad_w)
    ctx.mark_non_differentiable(grad_s, grad_w)
    ctx.set_materialize_grads(False)
    ctx.grad_mask = tuple(inputs[11])


def _topk_backward(ctx: Any, d_loss: torch.Tensor | None, *_unused: Any) -> tuple:
    out: list = [None] * 12
    if d_loss is None:
        return tuple(out)
    grad_s, grad_w = ctx.saved_tensors
    for index, grad, wanted in ((0, grad_s, ctx.grad_mask[0]), (3, grad_w, ctx.grad_mask[1])):
        if not ctx.needs_input_grad[index]:
            continue
        if not wanted:
            raise RuntimeError("pykd._distill_loss_topk_fused: an input needs a gradient that "
                               "grad_mask did not ask for; call torch.ops.pykd.distill_loss_topk.")
        # Out of place: a top-k loss is mostly used on cached teachers at modest sizes, and this
        # keeps a second backward through the same graph exact.
        scale = d_loss if d_loss.dim() == 0 or index == 3 else d_loss.unsqueeze(-1)
        out[index] = (grad * scale).to(grad.dtype)
    return tuple(out)


torch.library.register_autograd(_TOPK, _topk_backward, setup_context=_topk_setup_context)
