"""The MLP of CLIP, fused: fc1 -> QuickGELU -> fc2, saving only what its backward needs.

``quick_gelu`` (one pass on the triton backend), the pieces that hand-written backwards use
(``quick_gelu_resolved``, ``quick_gelu_grad``, ``quick_gelu_and_grad``) and ``quick_gelu_mlp``
(:class:`QuickGELUMLPFunction`: the input and the pre-activation saved, a LoRA update on either
Linear applied inside, see :mod:`xclip_fast.lowrank`). Backends and autocast as in :mod:`xclip_fast.ops`.
A layer hands its MLP over as a :class:`FusedMLP` (the two Linears and their LoRA updates), run by
:func:`run_mlp`; :func:`mlp_width` tells the hidden width the recompute levels account for.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from xclip_fast.lowrank import (
    add_low_rank_,
    as_inputs,
    cast_low_rank,
    from_inputs,
    low_rank_grads,
    low_rank_input_grad_,
    low_rank_linear,
)
from xclip_fast.ops import autocast_cast, autocast_dtype, resolve_backend, transforms_active

__all__ = ["FusedMLP", "run_mlp", "mlp_width", "quick_gelu", "quick_gelu_mlp", "quick_gelu_resolved",
           "quick_gelu_grad", "quick_gelu_and_grad", "QuickGELUMLPFunction"]


_QG = 1.702


def quick_gelu(h: torch.Tensor, backend: str = "auto", *, inplace: bool = False) -> torch.Tensor:
    """``h * sigmoid(1.702 h)`` (QuickGELU), one pass on the triton backend; ``inplace`` lets the torch
    backend write into ``h`` in eager mode (use the result: under torch.compile and on the triton
    backend a new tensor comes back). Differentiable:
    while autograd records ``h`` it saves ``h`` only (never in place)."""
    backend = resolve_backend(backend, h.device, dtype=h.dtype)
    if transforms_active():  # torch.func: plain operations, or the operator as a Function it differentiates
        if backend == "torch":
            return h * torch.sigmoid(_QG * h)
        from xclip_fast.library import QuickGELUFunction

        return QuickGELUFunction.apply(h)
    if torch.is_grad_enabled() and h.requires_grad:  # recorded: a Function, or the operator and its formula
        return _QuickGELUFunction.apply(h) if backend == "torch" else torch.ops.xclip_fast.quick_gelu(h)
    return quick_gelu_resolved(h, backend, inplace=inplace)


def _triton_quick_gelu(h: torch.Tensor) -> torch.Tensor:
    from xclip_fast import library as lib

    return lib.direct_quick_gelu(h) if lib.eager() else torch.ops.xclip_fast.quick_gelu(h)


def _triton_quick_gelu_backward(h: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    from xclip_fast import library as lib

    return lib.direct_quick_gelu_backward(h, dg) if lib.eager() else torch.ops.xclip_fast.quick_gelu_backward(h, dg)


def quick_gelu_resolved(h: torch.Tensor, backend: str, *, inplace: bool = False) -> torch.Tensor:
    """:func:`quick_gelu` with ``backend`` already resolved (``"triton"`` or ``"torch"``), not recorded
    by autograd: for code that writes its own backward (:func:`quick_gelu_grad`)."""
    if backend == "triton":
        return _triton_quick_gelu(h)
    if torch.compiler.is_compiling():
        # Out of place when traced: Inductor fuses it into one pass anyway, and torch 2.11 computes
        # wrong gradients for in-place ops inside an autograd.Function's forward within a
        # selectively checkpointed region (the recompute levels), which torch 2.13 gets right.
        return torch.sigmoid(h * _QG) * h
    if inplace:
        return h.mul_(torch.mul(h, _QG).sigmoid_())
    return torch.mul(h, _QG).sigmoid_().mul_(h)  # eager: one hidden-wide temporary, not two


def quick_gelu_grad(h: torch.Tensor, dg: torch.Tensor, backend: str) -> torch.Tensor:
    """d/dh of QuickGELU times ``dg``, ``backend`` resolved: ``dg (s + 1.702 h s (1 - s))`` with
    ``s = sigmoid(1.702 h)`` recomputed from ``h``."""
    if backend == "triton":
        return _triton_quick_gelu_backward(h, dg)
    hs = torch.mul(h, _QG)
    s = torch.sigmoid(hs)
    # dg s (1 - s) 1.702 h + dg s, in four passes
    return torch.ops.aten.sigmoid_backward(dg, s).mul_(hs).addcmul_(dg, s)


def quick_gelu_and_grad(h: torch.Tensor, dg: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """QuickGELU of ``h`` and :func:`quick_gelu_grad` of ``dg`` together (``backend`` resolved): the
    torch backend computes the sigmoid once for both."""
    if backend == "triton":
        return _triton_quick_gelu(h), _triton_quick_gelu_backward(h, dg)
    hs = torch.mul(h, _QG)
    s = torch.sigmoid(hs)
    return torch.mul(h, s), torch.ops.aten.sigmoid_backward(dg, s).mul_(hs).addcmul_(dg, s)


class _QuickGELUFunction(torch.autograd.Function):
    """QuickGELU on the torch backend saving its input only (autograd on the formula would keep the
    sigmoid too); the backward recomputes the sigmoid. The triton operator does the same in one pass."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return quick_gelu(h, "torch")  # autograd does not record inside forward

    @staticmethod
    @once_differentiable
    def backward(ctx, dg):
        (h,) = ctx.saved_tensors
        return quick_gelu_grad(h, dg, "torch")


class QuickGELUMLPFunction(torch.autograd.Function):
    """``fc2(QuickGELU(fc1(x)))`` saving ``x`` and the pre-activation only.

    Autograd on the plain modules keeps the pre-activation, the sigmoid and the activation output
    (three hidden-wide tensors per token); this keeps one and recomputes the rest in backward.
    ``backend`` is already resolved (``"triton"`` or ``"torch"``); all tensors share one dtype.
    ``a1, bl1, a2, bl2`` (or None) and ``scales``: the low-rank updates of the two Linears (see
    :mod:`xclip_fast.lowrank`).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, backend: str, a1=None, bl1=None, a2=None, bl2=None, scales=(0.0, 0.0)):
        x2 = x.reshape(-1, x.shape[-1])
        lora1, lora2 = from_inputs(a1, bl1, a2, bl2, scales)
        h = add_low_rank_(torch.addmm(b1, x2, w1.t()) if b1 is not None else x2 @ w1.t(), x2, lora1)
        g = quick_gelu(h, backend)
        y = add_low_rank_(torch.addmm(b2, g, w2.t()) if b2 is not None else g @ w2.t(), g, lora2)
        ctx.save_for_backward(x2, h, w1, w2, a1, bl1, a2, bl2)
        ctx.backend, ctx.has_b1, ctx.has_b2, ctx.x_shape, ctx.scales = (backend, b1 is not None, b2 is not None,
                                                                        x.shape, scales)
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, h, w1, w2, a1, bl1, a2, bl2 = ctx.saved_tensors
        need = (*ctx.needs_input_grad, *(False,) * (11 - len(ctx.needs_input_grad)))  # (updates are optional)
        need_x, need_w1, need_b1, need_w2, need_b2, _, need_a1, need_bl1, need_a2, need_bl2, _ = need
        lora1, lora2 = from_inputs(a1, bl1, a2, bl2, ctx.scales)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw1 = db1 = dw2 = db2 = da1 = dbl1 = da2 = dbl2 = None
        g = quick_gelu(h, ctx.backend) if need_w2 or need_a2 or need_bl2 else None
        if need_w2:
            dw2 = dy2.t() @ g
        if need_b2 and ctx.has_b2:
            db2 = dy2.sum(0)
        need_dh = need_x or need_w1 or need_b1 or need_a1 or need_bl1
        dg = dy2 @ w2 if need_dh else None
        da2, dbl2 = low_rank_grads(g, low_rank_input_grad_(dy2, dg, lora2), lora2, need_a2, need_bl2)
        if need_dh:
            dh = quick_gelu_grad(h, dg, ctx.backend)
            if need_w1:
                dw1 = dh.t() @ x2
            if need_b1 and ctx.has_b1:
                db1 = dh.sum(0)
            dx2 = dh @ w1 if need_x else None
            da1, dbl1 = low_rank_grads(x2, low_rank_input_grad_(dh, dx2, lora1), lora1, need_a1, need_bl1)
            dx = None if dx2 is None else dx2.view(ctx.x_shape)
        return dx, dw1, db1, dw2, db2, None, da1, dbl1, da2, dbl2, None


def quick_gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                   b2: torch.Tensor | None, *, backend: str = "auto", lora1=None, lora2=None) -> torch.Tensor:
    """``linear(quick_gelu(linear(x, w1, b1)), w2, b2)``, CLIP's MLP, fused.

    ``lora1``/``lora2``: a low-rank update ``(A, B, scale)`` of either Linear, applied inside (see
    :mod:`xclip_fast.lowrank`), or None.

    In training only ``x`` and the pre-activation are saved for backward (not the sigmoid and the
    activation); in inference the activation is computed in place where the backend allows. Under
    ``torch.autocast`` every tensor is cast to the autocast dtype (as ``linear`` would be) and the
    whole MLP, forward and backward, runs in it. Second-order gradients raise. Under a
    ``torch.func`` transform or forward-mode AD the MLP runs as ``linear``, :func:`quick_gelu` and
    ``linear`` (the activation on the triton kernel where it can run the transform, see
    :func:`xclip_fast.ops.transform_reason`; else plain operations, which every transform supports).
    """
    if transforms_active():
        backend = resolve_backend(backend, x.device, dtype=x.dtype)  # "triton" raises where it cannot run
        h = low_rank_linear(x, w1, b1, lora1)
        return low_rank_linear(quick_gelu(h, backend), w2, b2, lora2)
    cast = autocast_dtype(x.device)
    backend = resolve_backend(backend, x.device, dtype=cast or x.dtype)
    if cast is not None:
        x, w1, b1, w2, b2 = autocast_cast(cast, x, w1, b1, w2, b2)
        lora1, lora2 = cast_low_rank(cast, lora1), cast_low_rank(cast, lora2)
        with torch.autocast(x.device.type, enabled=False):
            return quick_gelu_mlp(x, w1, b1, w2, b2, backend=backend, lora1=lora1, lora2=lora2)
    low_rank, scales = as_inputs(lora1, lora2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, *low_rank)):
        return QuickGELUMLPFunction.apply(x, w1, b1, w2, b2, backend, *low_rank, scales)
    if lora1 is None and lora2 is None:
        h = F.linear(x, w1, b1)
        return F.linear(quick_gelu(h, backend, inplace=True), w2, b2)
    x2 = x.reshape(-1, x.shape[-1])
    g = quick_gelu(add_low_rank_(F.linear(x2, w1, b1), x2, lora1), backend, inplace=True)
    return add_low_rank_(F.linear(g, w2, b2), g, lora2).view(*x.shape[:-1], w2.shape[0])


class FusedMLP(NamedTuple):
    """CLIP's MLP as its two linear layers: ``fc2(QuickGELU(fc1(x)))``, run by the fused op.
    ``lora1``/``lora2``: a low-rank update ``(A, B, scale)`` of either Linear (a LoRA adapter, see
    :func:`xclip_fast.submodules.fused_linear`), applied inside the fused op; ``fc1``/``fc2`` are
    then the adapters' base Linears."""

    fc1: nn.Linear
    fc2: nn.Linear
    lora1: tuple | None = None
    lora2: tuple | None = None

    @property
    def low_rank(self) -> tuple:
        """``(A1, B1, A2, B2)`` (None where a Linear has no update) and ``(scale1, scale2)``."""
        return as_inputs(self.lora1, self.lora2)


MLP = Union[FusedMLP, Callable[[torch.Tensor], torch.Tensor]]


def run_mlp(mlp: MLP, x: torch.Tensor, backend: str, *, recomputed: bool = False) -> torch.Tensor:
    """The MLP of ``parts`` on ``x``: fused for a :class:`FusedMLP`, else the module is called.

    ``recomputed``: the MLP runs inside a recomputed region (whole-layer or selective checkpointing,
    see :mod:`xclip_fast.recompute`), as separate operations (the second GEMM last), so that the
    recomputation in backward stops before the second GEMM: the fused op saves its tensors only after
    its forward, which would run that GEMM again."""
    if isinstance(mlp, FusedMLP):
        if recomputed:
            h = quick_gelu(low_rank_linear(x, mlp.fc1.weight, mlp.fc1.bias, mlp.lora1), backend)
            return low_rank_linear(h, mlp.fc2.weight, mlp.fc2.bias, mlp.lora2)
        return quick_gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, backend=backend,
                              lora1=mlp.lora1, lora2=mlp.lora2)
    return mlp(x)


def mlp_width(mlp: MLP) -> int | None:
    """The hidden width of an MLP (the pre-activation the lean level keeps): a :class:`FusedMLP`'s, or
    the ``out_features`` of an MLP module's first layer (official ``c_fc``, Hugging Face ``fc1``, also
    when wrapped by PEFT); None when it cannot be told (then its first GEMM is recomputed)."""
    first = mlp.fc1 if isinstance(mlp, FusedMLP) else getattr(mlp, "c_fc", None) or getattr(mlp, "fc1", None)
    width = getattr(first, "out_features", None)
    return width if isinstance(width, int) else None
