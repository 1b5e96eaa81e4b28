"""The Triton kernels as PyTorch operators, ``torch.ops.xclip_fast.*``.

=====================================================================  =================================
operator                                                               returns
=====================================================================  =================================
``attention_fwd(q, k, v, extra_k?, extra_v?, scale)``                  ``(out, lse)``
``attention_bwd(q, k, v, extra_k?, extra_v?, out, lse, grad, scale)``  ``(dq, dk, dv, dextra_k, dextra_v)``
``packed_attention_fwd(qkv, extra_kv?, scale)``                        ``(out, lse)``
``packed_attention_bwd(qkv, extra_kv?, out, lse, grad, scale)``        ``(dqkv, dextra_kv)``
``quick_gelu(x)``                                                      ``y``
``quick_gelu_backward(x, grad_y)``                                     ``grad_x``
=====================================================================  =================================

Shapes and layouts are those of :mod:`xclip_fast.kernels.attention`: ``q: (B, Sq, H, D)``, ``k, v:
(B, Sk, H, D)``, ``extra_*: (B, H, D)``, ``qkv: (B, S, 3, H, D)``, ``extra_kv: (B, 2, H, D)``, any
strides with a contiguous last dimension. ``out`` keeps the memory order of ``q`` (seq-first in,
seq-first out); ``lse: (B, H, Sq)`` is fp32 (fp64 for fp64 inputs). Without the extra token the
backward's ``dextra_*`` are empty ``(0,)`` tensors (an operator cannot return None).

The forward operators carry their autograd formulas (``register_autograd``), so autograd and
``torch.compile`` see one differentiable operator each. The backward operators refuse to be
differentiated: second-order gradients through these kernels are not supported, and a gradient
penalty must fail loudly rather than drop its term.

Checks. Every operator validates its inputs itself, in the real and in the fake implementation,
before anything is allocated or launched: shapes (batch, heads and head dim of k/v, the extra
token, the saved ``out``/``lse`` and the incoming gradient of the backward), one supported
floating dtype, one device, a finite scale, head dim <= 128, and (real implementation) the device
the kernels run on; the messages are those of the Python API (:mod:`xclip_fast.checks`).

``torch.func`` and forward-mode AD. PyTorch runs a custom operator under forward-mode AD without any
formula (the tangents would silently be zero), so every real implementation refuses to run while a
dual level is open (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``/``hessian``). Every
operator has a batching rule for ``vmap`` (one launch whatever the vmapped size, see
:mod:`xclip_fast.batching`). Under ``torch.func.grad``/``vjp``/``jacrev`` of a raw operator PyTorch
raises by itself (it builds the operator's autograd without ``setup_context``); the Python API
(:mod:`xclip_fast.ops`) calls the operators through the Functions below (``AttentionFunction``,
``PackedAttentionFunction``, ``QuickGELUFunction``: the same operators and formulas), which those
transforms differentiate, and routes forward-mode AD and nested reverse mode to the torch backend.

Registration. On a GPU the operators are ``torch.library.triton_op``: the body is traceable (its
launches go through ``wrap_triton``) and is its own fake implementation, so Inductor sees and
schedules the kernels themselves. Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, the test
suite without a GPU), or when ``XCLIP_FAST_OPAQUE_OPS=1`` is set, they are plain
``torch.library.custom_op`` with a separate fake implementation: the interpreter runs kernels on
real CPU tensors only, so the body must stay opaque to tracing. Names, schemas, fake layouts and
autograd are the same either way.

Where: DESIGN.md plans the operators inside ``ops.py``; they live in this file instead so that
``ops.py`` stays the layer of checks, backend choice and autocast that imports without Triton (on
platforms without Triton wheels this module is never imported).

Precision. fp32 inputs use exact fp32 dot products unless TF32 is enabled in PyTorch
(``torch.set_float32_matmul_precision("high")``), read when an operator runs. Autocast is applied
by the Python API (:mod:`xclip_fast.ops`), which casts the operators' inputs; the operators take
the dtype they are given.
"""

import os
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from xclip_fast import batching
from xclip_fast.checks import (
    attention_problems,
    backward_problems,
    elementwise_problems,
    packed_problems,
    raise_problems,
    scale_problems,
)
from xclip_fast.kernels import acc_dtype, dispatch_mode_active
from xclip_fast.kernels import attention as _kernels
from xclip_fast.kernels.attention import MAX_HEAD_DIM
from xclip_fast.kernels.attention import attention_bwd as _attention_bwd_launch
from xclip_fast.kernels.attention import attention_fwd as _attention_fwd_launch
from xclip_fast.kernels.quick_gelu import quick_gelu_bwd as _quick_gelu_bwd_launch
from xclip_fast.kernels.quick_gelu import quick_gelu_fwd as _quick_gelu_fwd_launch

__all__ = ["OPAQUE", "INTERPRETING", "empty_out", "eager", "direct_packed_fwd", "direct_packed_bwd",
           "direct_quick_gelu", "direct_quick_gelu_backward", "AttentionFunction", "PackedAttentionFunction",
           "QuickGELUFunction"]

# Triton decides when it is imported: kernels are interpreted iff TRITON_INTERPRET was set then
INTERPRETING = type(_kernels._sequence_fwd_kernel).__name__ == "InterpretedFunction"
OPAQUE = INTERPRETING or os.environ.get("XCLIP_FAST_OPAQUE_OPS", "0") not in ("", "0")


def _define(name: str, impl, fake):
    """Register ``xclip_fast::name`` as a triton_op (GPU) or an opaque custom_op (see the module doc)."""
    qualname = f"xclip_fast::{name}"
    if OPAQUE:
        op = torch.library.custom_op(qualname, impl, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, impl, mutates_args=())


def _refuse_double_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"xclip_fast: second-order gradients through {name} are not supported (its backward is not "
            "differentiable). For gradient penalties, run the model with backend='reference' under "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH).")

    return backward


# ------------------------------------------------------------------------------------------------
# checks: every operator validates its inputs itself (the real and the fake implementation), with
# the messages of the Python API, before anything is allocated or launched
# ------------------------------------------------------------------------------------------------
def _check_kernel_device(name: str, t: Tensor) -> None:
    """The real implementations run where the kernels run: CUDA tensors, or CPU tensors under the
    interpreter (a kernel given memory of another device would read out of bounds)."""
    want = "cpu" if INTERPRETING else "cuda"
    if t.device.type != want:
        where = ("CPU tensors (Triton's interpreter, TRITON_INTERPRET=1)" if INTERPRETING else "CUDA tensors")
        raise ValueError(f"xclip_fast::{name}: the kernels run on {where}; got {t.device.type} tensors")


def _refuse_forward_ad(name: str) -> None:
    """Forward-mode AD would silently drop the tangents of a custom operator (PyTorch runs it
    without any formula): refuse it whenever a dual level is open, including inside
    ``torch.func.jvp``/``jacfwd``, where the operator cannot see the tangents."""
    if _fwAD._current_level >= 0:
        raise RuntimeError(
            f"xclip_fast::{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
            "is not supported by the Triton kernels. Call xclip_fast.attention / packed_attention / the modules with "
            "backend='auto' or 'torch', which run such calls with plain PyTorch operations.")


def _check_attention(name: str, q, k, v, extra_k, extra_v, scale) -> None:
    problems = attention_problems(q, k, v, extra_k, extra_v, max_head_dim=MAX_HEAD_DIM)
    raise_problems(scale_problems(scale, problems), f"xclip_fast::{name}")


def _check_packed(name: str, qkv, extra_kv, scale) -> None:
    problems = packed_problems(qkv, extra_kv, max_head_dim=MAX_HEAD_DIM)
    raise_problems(scale_problems(scale, problems), f"xclip_fast::{name}")


def _check_backward(name: str, q_shape: tuple, like: Tensor, out, lse, grad) -> None:
    """``q_shape``: the queries' shape; ``like``: an input with the queries' dtype and device (no
    tensor is made here: the checks also run while a graph is traced)."""
    raise_problems(backward_problems(q_shape, like.dtype, like.device, out, lse, grad, acc_dtype(like.dtype)),
                   f"xclip_fast::{name}")


def _packed_q_shape(qkv: Tensor) -> tuple:
    B, S, _, H, D = qkv.shape
    return (B, S, H, D)


def _check_elementwise(name: str, **named) -> None:
    raise_problems(elementwise_problems(named), f"xclip_fast::{name}")


def _enter(name: str, first: Tensor) -> None:
    """What every real implementation checks on entry beyond the shapes: device and forward AD."""
    _refuse_forward_ad(name)
    _check_kernel_device(name, first)


# ------------------------------------------------------------------------------------------------
# allocation: shared by the real and the fake implementations, so their layouts cannot differ
# ------------------------------------------------------------------------------------------------
def empty_out(like: Tensor) -> Tensor:
    """An output ``(B, S, H, D)`` laid out like ``like`` when ``like`` is a seq-first view (so the
    next GEMM reads it without a copy), else contiguous."""
    B, S, H, D = like.shape
    if like.stride(0) < like.stride(1):
        return torch.empty(S, B, H, D, dtype=like.dtype, device=like.device).transpose(0, 1)
    return torch.empty(B, S, H, D, dtype=like.dtype, device=like.device)


def _empty_lse(q: Tensor) -> Tensor:
    B, S, H, _ = q.shape
    return torch.empty(B, H, S, dtype=acc_dtype(q.dtype), device=q.device)


def _empty_grad(t: Tensor) -> Tensor:
    """A gradient buffer with ``t``'s layout when that layout is dense, else contiguous."""
    g = torch.empty_like(t)
    return g if g.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _no_extra(q: Tensor) -> Tensor:
    return q.new_empty(0)


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` when its last dimension is contiguous (or of size 1, whose stride is never used), else a
    contiguous copy. ``Tensor.contiguous`` alone is not enough: it keeps a size-1 dimension's stride."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def eager() -> bool:
    """Whether this call runs eagerly: nothing traces it (``torch.compile``, ``torch.export``, a TorchScript
    trace), and no dispatch mode (a fake, proxy or functional mode, or a user's, which must see the
    operators) is active. Autograd Functions that resolved the triton backend on inputs they built
    themselves then launch through the ``direct_*`` functions: the operator's work without PyTorch's
    dispatch of a Python operator and without checking its inputs a second time."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or dispatch_mode_active())


# ------------------------------------------------------------------------------------------------
# attention on separate q, k, v
# ------------------------------------------------------------------------------------------------
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, extra_k: Optional[Tensor], extra_v: Optional[Tensor],
                   scale: float) -> tuple[Tensor, Tensor]:
    _check_attention("attention_fwd", q, k, v, extra_k, extra_v, scale)
    _enter("attention_fwd", q)
    q, k, v, extra_k, extra_v = (_last_dim_contiguous(t) for t in (q, k, v, extra_k, extra_v))
    out, lse = empty_out(q), _empty_lse(q)
    _attention_fwd_launch(q, k, v, extra_k, extra_v, out, lse, scale, _tf32())
    return out, lse


def _attention_fwd_fake(q, k, v, extra_k, extra_v, scale):
    _check_attention("attention_fwd", q, k, v, extra_k, extra_v, scale)
    q = _last_dim_contiguous(q)  # as the real implementation: the output's layout follows this q
    return empty_out(q), _empty_lse(q)


def _attention_bwd(q: Tensor, k: Tensor, v: Tensor, extra_k: Optional[Tensor], extra_v: Optional[Tensor],
                   out: Tensor, lse: Tensor, grad: Tensor, scale: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_attention("attention_bwd", q, k, v, extra_k, extra_v, scale)
    _check_backward("attention_bwd", tuple(q.shape), q, out, lse, grad)
    _enter("attention_bwd", q)
    q, k, v, extra_k, extra_v, out, grad = (_last_dim_contiguous(t) for t in (q, k, v, extra_k, extra_v, out, grad))
    lse = lse.contiguous()
    dq, dk, dv = _empty_grad(q), _empty_grad(k), _empty_grad(v)
    if extra_k is None:
        dek, dev = _no_extra(q), _no_extra(q)
        _attention_bwd_launch(q, k, v, None, None, out, lse, grad, dq, dk, dv, None, None, scale, _tf32())
    else:
        dek, dev = _empty_grad(extra_k), _empty_grad(extra_v)
        _attention_bwd_launch(q, k, v, extra_k, extra_v, out, lse, grad, dq, dk, dv, dek, dev, scale, _tf32())
    return dq, dk, dv, dek, dev


def _attention_bwd_fake(q, k, v, extra_k, extra_v, out, lse, grad, scale):
    _check_attention("attention_bwd", q, k, v, extra_k, extra_v, scale)
    _check_backward("attention_bwd", tuple(q.shape), q, out, lse, grad)
    q, k, v, extra_k, extra_v = (_last_dim_contiguous(t) for t in (q, k, v, extra_k, extra_v))
    if extra_k is None:
        return _empty_grad(q), _empty_grad(k), _empty_grad(v), _no_extra(q), _no_extra(q)
    return _empty_grad(q), _empty_grad(k), _empty_grad(v), _empty_grad(extra_k), _empty_grad(extra_v)


attention_fwd = _define("attention_fwd", _attention_fwd, _attention_fwd_fake)
attention_bwd = _define("attention_bwd", _attention_bwd, _attention_bwd_fake)
_attention_bwd_call = batching.transformable(attention_bwd, _refuse_double_backward("the triton attention"))


def _attention_setup(ctx, inputs, output):
    q, k, v, extra_k, extra_v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dek, dev = _attention_bwd_call(q, k, v, extra_k, extra_v, out, lse, grad_out, ctx.scale)
    if extra_k is None:
        dek = dev = None
    return dq, dk, dv, dek, dev, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)
attention_bwd.register_autograd(_refuse_double_backward("the triton attention"))
attention_fwd.register_vmap(batching.folded_rule(attention_fwd))
attention_bwd.register_vmap(batching.folded_rule(attention_bwd))
AttentionFunction = batching.function_for("AttentionFunction", attention_fwd, _attention_setup, _attention_backward)


# ------------------------------------------------------------------------------------------------
# attention on a packed in-projection output (the modules' path): one dqkv buffer back
# ------------------------------------------------------------------------------------------------
def _unbind_extra(extra_kv: Optional[Tensor]):
    return extra_kv.unbind(1) if extra_kv is not None else (None, None)


def _packed_attention_fwd(qkv: Tensor, extra_kv: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    _check_packed("packed_attention_fwd", qkv, extra_kv, scale)
    _enter("packed_attention_fwd", qkv)
    return direct_packed_fwd(qkv, extra_kv, scale)


def direct_packed_fwd(qkv: Tensor, extra_kv: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """``packed_attention_fwd``'s launch without the operator or its checks, for an eager caller that
    resolved the triton backend on inputs it built itself (see :func:`eager`)."""
    qkv, extra_kv = _last_dim_contiguous(qkv), _last_dim_contiguous(extra_kv)
    q, k, v = qkv.unbind(2)
    out, lse = empty_out(q), _empty_lse(q)
    _attention_fwd_launch(q, k, v, *_unbind_extra(extra_kv), out, lse, scale, _tf32())
    return out, lse


def _packed_attention_fwd_fake(qkv, extra_kv, scale):
    _check_packed("packed_attention_fwd", qkv, extra_kv, scale)
    q = _last_dim_contiguous(qkv).unbind(2)[0]
    return empty_out(q), _empty_lse(q)


def _packed_attention_bwd(qkv: Tensor, extra_kv: Optional[Tensor], out: Tensor, lse: Tensor, grad: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    _check_packed("packed_attention_bwd", qkv, extra_kv, scale)
    _check_backward("packed_attention_bwd", _packed_q_shape(qkv), qkv, out, lse, grad)
    _enter("packed_attention_bwd", qkv)
    return direct_packed_bwd(qkv, extra_kv, out, lse, grad, scale)


def direct_packed_bwd(qkv: Tensor, extra_kv: Optional[Tensor], out: Tensor, lse: Tensor, grad: Tensor,
                      scale: float) -> tuple[Tensor, Tensor]:
    """``packed_attention_bwd``'s launches without the operator or its checks (see :func:`direct_packed_fwd`)."""
    qkv, extra_kv, out, grad = (_last_dim_contiguous(t) for t in (qkv, extra_kv, out, grad))
    lse = lse.contiguous()
    dqkv = _empty_grad(qkv)
    dq, dk, dv = dqkv.unbind(2)
    if extra_kv is None:
        dextra_kv, dek, dev = _no_extra(qkv), None, None
    else:
        dextra_kv = torch.empty(extra_kv.shape, dtype=extra_kv.dtype, device=extra_kv.device)
        dek, dev = dextra_kv.unbind(1)
    q, k, v = qkv.unbind(2)
    _attention_bwd_launch(q, k, v, *_unbind_extra(extra_kv), out, lse, grad, dq, dk, dv, dek, dev, scale, _tf32())
    return dqkv, dextra_kv


def _packed_attention_bwd_fake(qkv, extra_kv, out, lse, grad, scale):
    _check_packed("packed_attention_bwd", qkv, extra_kv, scale)
    _check_backward("packed_attention_bwd", _packed_q_shape(qkv), qkv, out, lse, grad)
    qkv = _last_dim_contiguous(qkv)
    if extra_kv is None:
        return _empty_grad(qkv), _no_extra(qkv)
    return _empty_grad(qkv), torch.empty(extra_kv.shape, dtype=extra_kv.dtype, device=extra_kv.device)


packed_attention_fwd = _define("packed_attention_fwd", _packed_attention_fwd, _packed_attention_fwd_fake)
packed_attention_bwd = _define("packed_attention_bwd", _packed_attention_bwd, _packed_attention_bwd_fake)
_packed_bwd_call = batching.transformable(packed_attention_bwd, _refuse_double_backward("the triton attention"))


def _packed_setup(ctx, inputs, output):
    qkv, extra_kv, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, extra_kv, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, grad_out, _grad_lse):
    qkv, extra_kv, out, lse = ctx.saved_tensors
    dqkv, dextra_kv = _packed_bwd_call(qkv, extra_kv, out, lse, grad_out, ctx.scale)
    return dqkv, (dextra_kv if extra_kv is not None else None), None


packed_attention_fwd.register_autograd(_packed_backward, setup_context=_packed_setup)
packed_attention_bwd.register_autograd(_refuse_double_backward("the triton attention"))
packed_attention_fwd.register_vmap(batching.folded_rule(packed_attention_fwd))
packed_attention_bwd.register_vmap(batching.folded_rule(packed_attention_bwd))
PackedAttentionFunction = batching.function_for("PackedAttentionFunction", packed_attention_fwd, _packed_setup,
                                                _packed_backward)


# ------------------------------------------------------------------------------------------------
# QuickGELU
# ------------------------------------------------------------------------------------------------
def _quick_gelu(x: Tensor) -> Tensor:
    _check_elementwise("quick_gelu", x=x)
    _enter("quick_gelu", x)
    return direct_quick_gelu(x)


def direct_quick_gelu(x: Tensor) -> Tensor:
    """``quick_gelu``'s launch without the operator or its checks (see :func:`direct_packed_fwd`)."""
    x = x.contiguous()
    return _quick_gelu_fwd_launch(x, torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _quick_gelu_fake(x):
    _check_elementwise("quick_gelu", x=x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _quick_gelu_backward(x: Tensor, grad: Tensor) -> Tensor:
    _check_elementwise("quick_gelu_backward", x=x, grad=grad)
    _enter("quick_gelu_backward", x)
    return direct_quick_gelu_backward(x, grad)


def direct_quick_gelu_backward(x: Tensor, grad: Tensor) -> Tensor:
    """``quick_gelu_backward``'s launch without the operator or its checks (see :func:`direct_packed_fwd`)."""
    x, grad = x.contiguous(), grad.contiguous()
    return _quick_gelu_bwd_launch(x, grad, torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _quick_gelu_backward_fake(x, grad):
    _check_elementwise("quick_gelu_backward", x=x, grad=grad)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


quick_gelu = _define("quick_gelu", _quick_gelu, _quick_gelu_fake)
quick_gelu_backward = _define("quick_gelu_backward", _quick_gelu_backward, _quick_gelu_backward_fake)
_quick_gelu_backward_call = batching.transformable(quick_gelu_backward, _refuse_double_backward("the triton QuickGELU"))


def _quick_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _quick_gelu_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return _quick_gelu_backward_call(x, grad)


quick_gelu.register_autograd(_quick_gelu_grad, setup_context=_quick_gelu_setup)
quick_gelu_backward.register_autograd(_refuse_double_backward("the triton QuickGELU"))
quick_gelu.register_vmap(batching.elementwise_rule(quick_gelu))
quick_gelu_backward.register_vmap(batching.elementwise_rule(quick_gelu_backward))
QuickGELUFunction = batching.function_for("QuickGELUFunction", quick_gelu, _quick_gelu_setup, _quick_gelu_grad)
