"""torch.library glue for the compiled ops: fake (meta) kernels and autograd.

``torch.ops.pykd.distill_loss`` is a composite (C++) that calls ``_distill_loss_fused`` with a
``grad_mask`` naming the inputs that need a gradient; the fused kernel returns those gradients,
computed in the same pass as the loss for d(loss) = 1. The first backward only rescales them by the
incoming gradient, in place, and skips even that when it is exactly 1 (the usual
``loss.backward()``), so the gradient costs no memory or pass beyond the forward's.

``fused_linear_distill_loss`` and ``distill_loss_topk`` follow the same pattern (a composite over
an internal op that returns its gradients). The top-k op's student gradient is ``[N, V]`` like the
dense op's and is scaled in place too; the fused-linear op's gradients (hidden states, weights)
are small next to the logits it never materialises, so its backward scales out of place.

All three internal ops share one shape: ``(loss, *grads)``, ``grads[i]`` being the gradient of
the input named ``differentiable[i]``, asked for by ``grad_mask[i]``. :class:`_FusedLossOp`
registers their fake kernel and autograd reading arguments by the names of the op's schema, so
adding an argument to a schema cannot shift the others.

The autograd kernel is registered directly at the ``Autograd`` dispatch key, as
``torch.library.register_autograd`` does, but without its generic per-call work (re-filling
schema defaults, out-variant checks: ~40 us a call, as much as the whole kernel at N=4096 and a
few classes); these schemas have no defaults to fill and no out variants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pykd import _checks


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(grad: torch.Tensor, d_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """grad times d_loss, d_loss being [] or grad's shape or its leading shape (rows, V)."""
    if in_place:
        torch.ops.pykd._scale_grad_(grad, d_loss)
        return grad
    rowwise = d_loss.dim() not in (0, grad.dim())
    scale = d_loss.unsqueeze(-1) if rowwise else d_loss
    return (grad * scale).to(grad.dtype)


class _FusedLossOp:
    """Fake kernel and autograd of one internal ``pykd::_<op>`` returning ``(loss, *grads)``.

    ``differentiable`` names, in ``grad_mask`` order, the inputs whose gradients the op returns;
    ``check`` is the op's argument check from :mod:`pykd._checks` (called with the arguments by
    name). Gradients named in ``in_place`` are scaled in their own buffer on the first backward;
    a later backward through the same graph recomputes them (the inputs are kept for that).
    """

    def __init__(self, name: str, public: str, differentiable: tuple[str, ...],
                 check: Callable[..., None], in_place: tuple[str, ...] = ()) -> None:
        self.qualname = f"pykd::{name}"
        self.public = public
        self.op = getattr(torch.ops.pykd, name).default
        arguments = self.op._schema.arguments
        self.names = tuple(a.name for a in arguments)
        self.position = {n: i for i, n in enumerate(self.names)}
        missing = {"grad_mask", "reduction", *differentiable} - set(self.names)
        if missing:  # a schema change this glue does not know: fail at import, not in a backward
            raise RuntimeError(f"{self.qualname} has no argument(s) {sorted(missing)}")
        self.tensor_args = tuple(i for i, a in enumerate(arguments) if "Tensor" in str(a.type))
        self.differentiable = differentiable
        self.check = check
        self.in_place = in_place
        torch.library.register_fake(self.qualname, self.fake)
        _LIB.impl(name, self._autograd_kernel(), "Autograd", with_keyset=True)

    def _autograd_kernel(self) -> Callable:
        op, glue = self.op, self

        def forward(ctx: Any, keyset: Any, *args: Any) -> tuple:
            with torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
            glue.setup_context(ctx, args, output)
            return output

        def backward(ctx: Any, *grads: Any) -> tuple:
            # needs_input_grad counts the keyset argument first.
            return (None, *glue.backward(ctx, *grads))

        # Made with type() so that its grad_fn reads "pykd_distill_lossBackward" (autograd names
        # the node when the class is created).
        Function = type(f"pykd_{self.public}", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(backward)})

        def kernel(keyset: Any, *args: Any) -> tuple:
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                return Function.apply(keyset, *args)
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

        return kernel

    def bind(self, args: tuple, kwargs: dict | None = None) -> dict[str, Any]:
        bound = dict(zip(self.names, args))
        bound.update(kwargs or {})
        return bound

    def fake(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        a = self.bind(args, kwargs)
        # On the meta device and under torch.compile the C++ checks never run: refuse here.
        self.check(**{k: v for k, v in a.items() if k != "grad_mask"})
        first = a[self.names[0]]
        acc = _acc_dtype(first.dtype)
        shape = first.shape[:-1] if a["reduction"] == "none" else ()
        outputs = [first.new_empty(shape, dtype=acc)]
        for name, wanted in zip(self.differentiable, a["grad_mask"]):
            x = a[name]
            if x is None:
                # The stand-in for an absent input, as the C++ makes it: for the row weights in
                # the accumulation dtype (the reduction's), for any other in the logits dtype.
                dtype = acc if name == "weight" else first.dtype
                outputs.append(first.new_empty((0,), dtype=dtype))
            else:
                outputs.append(x.new_empty(x.shape if wanted else (0,)))
        return tuple(outputs)

    def setup_context(self, ctx: Any, inputs: tuple, output: tuple) -> None:
        grads = output[1:]
        # Only an in-place op needs its inputs again; keeping them costs nothing extra (the caller
        # holds them for the step anyway).
        kept = [inputs[i] for i in self.tensor_args] if self.in_place else []
        ctx.save_for_backward(*kept, *grads)
        ctx.options = {i: v for i, v in enumerate(inputs) if i not in self.tensor_args}
        # The gradient outputs are not differentiable; without this autograd would also materialise
        # [N, V] zero tensors as their incoming gradients on every backward.
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)
        ctx.grad_mask = tuple(inputs[self.position["grad_mask"]])
        ctx.first_backward = True

    def _recompute(self, ctx: Any, kept: tuple) -> tuple:
        args: list = [None] * len(self.names)
        for i, x in zip(self.tensor_args, kept):
            args[i] = None if x is None else x.detach()
        for i, v in ctx.options.items():
            args[i] = v
        return self.op(*args)[1:]

    def backward(self, ctx: Any, d_loss: torch.Tensor | None, *_unused: Any) -> tuple:
        out: list = [None] * len(self.names)
        if d_loss is None:  # grads are not materialised: nothing flows back into the loss
            return tuple(out)
        needs = ctx.needs_input_grad[1:]  # after the autograd kernel's keyset
        for i, name in enumerate(self.differentiable):
            if needs[self.position[name]] and not ctx.grad_mask[i]:
                raise RuntimeError(
                    f"{self.qualname}: {name} needs a gradient but grad_mask[{i}] was False; "
                    f"call torch.ops.pykd.{self.public}, which sets the mask from requires_grad."
                )
        if not self.in_place or ctx.first_backward:
            # Unpacked once for an in-place op: scaling the buffers bumps their version counters.
            saved = ctx.saved_tensors
            split = len(saved) - len(self.differentiable)
            ctx.kept, grads = saved[:split], saved[split:]
            ctx.first_backward = False
        else:
            # The first backward scaled the buffers in place and handed them out (retain_graph,
            # gradcheck): make fresh ones rather than touch them again.
            grads = self._recompute(ctx, ctx.kept)
        # Plain eager tensors take the zero-copy path (in place, skipped when d_loss == 1). Under
        # torch.compile's tracing (functional tensor subclasses) the functional form lets the
        # compiler fuse and re-use buffers itself.
        eager = type(d_loss) is torch.Tensor
        for i, (name, grad) in enumerate(zip(self.differentiable, grads)):
            if ctx.grad_mask[i] and needs[self.position[name]]:
                out[self.position[name]] = _scaled(grad, d_loss, eager and name in self.in_place)
        return tuple(out)


_LIB = torch.library.Library("pykd", "IMPL")  # the autograd kernels; kept alive with the module


@torch.library.register_fake("pykd::_scale_grad_")
def _scale_grad_fake(grad, scale):
    return None


_FusedLossOp("_distill_loss_fused", "distill_loss", ("student", "teacher", "weight"),
             _checks.check_distill_args, in_place=("student", "teacher"))
_FusedLossOp("_fused_linear_distill_loss", "fused_linear_distill_loss",
             ("student_hidden", "student_weight", "student_bias", "weight"),
             _checks.check_fused_linear_args)
_FusedLossOp("_distill_loss_topk_fused", "distill_loss_topk", ("student", "weight"),
             _checks.check_topk_args, in_place=("student",))
