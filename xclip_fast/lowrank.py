"""A low-rank update (LoRA) applied inside the fused MLP: ``linear(x, W, b) + s * (x A^T) B^T``.

A Linear of the MLP wrapped by a LoRA adapter (PEFT's, or a user's own that declares itself, see
:func:`xclip_fast.submodules.fused_linear`) keeps the fused MLP: its base weight is read as for a
plain Linear, and the update is added here, in the forward and the backward of the fused Functions,
without merging it into a weight. ``lora`` below is ``(A (r, in), B (out, r), s)``, or None for a
Linear without one. Nothing rank-wide is saved for the backward: ``x A^T`` is recomputed there
from the input the backward has anyway (a GEMM ``r / out`` the size of the base's).

A and B may hold another dtype than the base Linear: PEFT keeps its adapters in float32 by default,
also in a bfloat16 model. The update is then computed as PEFT's LoRA ``Linear`` computes it: the input
cast to the adapters' dtype, ``(x A^T) B^T * s`` in that dtype, added to the base's output in the
promoted dtype and the sum cast back to the base's (its gradients likewise, each in its own tensor's
dtype). That costs a cast copy of the input (as in PEFT); with one dtype everywhere nothing is cast.
"""

from __future__ import annotations

import torch

__all__ = ["add_low_rank_", "low_rank_input_grad_", "low_rank_grads", "low_rank_linear", "cast_low_rank",
           "as_inputs", "from_inputs"]

_NONE = (None, None, 0.0)


def as_inputs(lora1, lora2) -> tuple[tuple, tuple]:
    """The two Linears' updates as an autograd Function takes them: the tensors ``(A1, B1, A2, B2)``
    (None where a Linear has no update) and the constants ``(scale1, scale2)``."""
    (a1, b1, s1), (a2, b2, s2) = lora1 or _NONE, lora2 or _NONE
    return (a1, b1, a2, b2), (s1, s2)


def from_inputs(a1, b1, a2, b2, scales) -> tuple:
    """The inverse of :func:`as_inputs`: ``(lora1, lora2)``, each ``(A, B, scale)`` or None."""
    return (None if a1 is None else (a1, b1, scales[0])), (None if a2 is None else (a2, b2, scales[1]))


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype (itself when it is already)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def add_low_rank_(y2: torch.Tensor, x2: torch.Tensor, lora) -> torch.Tensor:
    """``y2 += s * (x2 A^T) B^T`` in place on the rows ``y2 (N, out)`` of ``x2 (N, in)``; returns ``y2``."""
    if lora is not None:
        a, b, s = lora
        if a.dtype == y2.dtype == x2.dtype:
            y2.addmm_(x2.mm(a.t()), b.t(), alpha=s)
        else:  # PEFT's order: in A's dtype, scaled last, added in the promoted dtype (an in-place add's)
            y2.add_(_as(x2, a).mm(a.t()).mm(b.t()).mul_(s))
    return y2


def low_rank_input_grad_(dy2: torch.Tensor, dx2: torch.Tensor | None, lora) -> tuple | None:
    """Adds the update's share ``s * (dy2 B) A`` of the input gradient to ``dx2`` in place (when
    given); returns ``(dy2, dy2 B)`` in the adapters' dtype (``dy2`` cast once) for
    :func:`low_rank_grads`, or None without an update."""
    if lora is None:
        return None
    a, b, s = lora
    dyc = _as(dy2, b)
    dyb = dyc.mm(b)  # (N, r)
    if dx2 is not None:
        if dx2.dtype == a.dtype:
            dx2.addmm_(dyb, a, alpha=s)
        else:
            dx2.add_(dyb.mm(a), alpha=s)
    return dyc, dyb


def low_rank_grads(x2: torch.Tensor, dy: tuple | None, lora, need_a: bool, need_b: bool) -> tuple:
    """``(dA, dB)`` of the update from the input rows ``x2`` and ``dy = (dy2, dy2 B)``, the output's
    gradient rows as :func:`low_rank_input_grad_` returns them; ``(None, None)`` without an update."""
    if lora is None or not (need_a or need_b):
        return None, None
    a, b, s = lora
    dyc, dyb = dy
    xc = _as(x2, a)
    da = dyb.t().mm(xc).mul_(s) if need_a else None
    db = dyc.t().mm(xc.mm(a.t())).mul_(s) if need_b else None
    return da, db


def low_rank_linear(x: torch.Tensor, w: torch.Tensor, bias, lora) -> torch.Tensor:
    """``linear(x, w, bias)`` plus the update, as recorded operations (autograd, transforms); with the
    adapters in another dtype, PEFT's computation (see the module's docstring)."""
    y = torch.nn.functional.linear(x, w, bias)
    if lora is None:
        return y
    a, b, s = lora
    update = torch.nn.functional.linear(torch.nn.functional.linear(_as(x, a), a), b) * s
    return y + update if update.dtype == y.dtype else (y + update).to(y.dtype)


def cast_low_rank(cast, lora):
    """The update with A and B cast as autocast casts a matrix product's inputs (``cast`` None: as it is)."""
    if lora is None or cast is None:
        return lora
    a, b, s = lora
    return (*(t.to(cast) if t.dtype != torch.float64 else t for t in (a, b)), s)
