"""Linear LM heads whose logits are never materialised (``Distiller(fused_lm_head=True)``).

The hidden states that feed a head are taken from the head itself: while a model runs, its head's
``forward`` is replaced by one that records its input and returns a zero-strided stand-in of the
logits' shape (no memory). This finds the right tensor whatever the architecture (final norm or
not, tied embeddings, a head applied to a slice of the sequence), where ``hidden_states[-1]`` is
model-specific. The model must return the head's output as its logits, unchanged: the stand-in
is checked to come back, so logits that the model post-processes (soft-capping, scaling,
slicing) raise an error instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Union

import torch
from torch import nn

HeadLike = Union[str, Callable[[nn.Module], nn.Module]]


@dataclasses.dataclass
class LinearRows:
    """Rows whose logits are ``hidden @ weight.T + bias``, kept as the three factors."""

    hidden: torch.Tensor  # (*, H)
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]

    def to(self, device: torch.device, dtype: torch.dtype) -> LinearRows:
        """All three on ``device`` in ``dtype`` (differentiable casts)."""
        bias = None if self.bias is None else self.bias.to(device, dtype)
        return LinearRows(self.hidden.to(device, dtype), self.weight.to(device, dtype), bias)

    def argmax(self, chunk_size: int) -> torch.Tensor:
        """The logits' argmax over the vocabulary, ``chunk_size`` rows of logits at a time."""
        flat = self.hidden.detach().reshape(-1, self.hidden.shape[-1])
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        parts = [nn.functional.linear(chunk, weight, bias).argmax(-1)
                 for chunk in flat.split(chunk_size)]
        out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.long)
        return out.view(self.hidden.shape[:-1])


def resolve_head(model: nn.Module, head: HeadLike, who: str) -> nn.Linear:
    """The ``nn.Linear`` named by ``head``: a dotted attribute path or ``fn(model)``."""
    try:
        module = model.get_submodule(head) if isinstance(head, str) else head(model)
    except AttributeError as error:
        raise ValueError(
            f"fused_lm_head: the {who} has no submodule {head!r}; pass {who}_head= the name of "
            f"its LM head or a function returning it"
        ) from error
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"fused_lm_head needs the {who}'s head to be an nn.Linear, got "
            f"{type(module).__name__} for {who}_head={head!r}"
        )
    return module


class HeadCapture:
    """While active, ``head`` records its input instead of computing logits.

    Use as a context manager around one forward of the model, then :meth:`hidden` with the
    logits the model returned.
    """

    def __init__(self, head: nn.Linear, who: str) -> None:
        self.head, self.who = head, who
        self.input: torch.Tensor | None = None
        self.stand_in: torch.Tensor | None = None
        self._previous: Callable[..., torch.Tensor] | None = None

    def __enter__(self) -> HeadCapture:
        # An instance attribute shadows the class's forward for this module only; one that was
        # already there (a wrapper's hook) is put back afterwards.
        self._previous = self.head.__dict__.get("forward")
        self.head.forward = self._capture
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            del self.head.forward
        else:
            self.head.forward = self._previous

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        if self.input is not None:
            raise RuntimeError(
                f"fused_lm_head: the {self.who}'s head was called twice in one forward; only "
                "a head applied once to the final hidden states can be fused"
            )
        self.input = x
        # float32, so that the common ``logits.float()`` of a model's forward returns it as is.
        self.stand_in = x.new_zeros((), dtype=torch.float32).expand(*x.shape[:-1],
                                                                    self.head.out_features)
        return self.stand_in

    def hidden(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's input, once checked that ``logits`` are the head's untouched output."""
        stand_in = self.stand_in
        if stand_in is None:
            raise RuntimeError(f"fused_lm_head: the {self.who}'s head was not called")
        if (logits.data_ptr(), logits.shape, logits.stride()) != \
                (stand_in.data_ptr(), stand_in.shape, stand_in.stride()):
            raise ValueError(
                f"fused_lm_head: the {self.who} does not return its head's output unchanged as "
                "the logits (it scales, caps, casts or slices them), so they cannot be computed "
                "from the head's input and weights; use fused_lm_head=False for this model"
            )
        return self.input
