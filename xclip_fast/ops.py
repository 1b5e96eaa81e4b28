"""Attention and MLP ops: input checks, the one backend resolver, autocast, the fused MLP.

Backends:

- ``"triton"``: the kernels of ``xclip_fast.kernels`` through the operators of
  :mod:`xclip_fast.library` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
  triton was imported).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` and plain PyTorch, any device.
- ``"auto"``: ``"triton"`` for CUDA tensors when the kernels can run the call, ``"torch"`` otherwise.
  It never raises for something the torch backend can do.

Modules additionally know ``"reference"`` (the original computation, see ``reference.py``).

Autocast: under ``torch.autocast`` the inputs of the attention and of the fused MLP are cast to the
autocast dtype, as autocast does for ``scaled_dot_product_attention`` and ``linear`` (fp64 stays
fp64), and the ops run in that dtype, forward and backward; nothing saved for backward is upcast.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from xclip_fast.checks import attention_problems, packed_problems, raise_problems, scale_problems
from xclip_fast.dtypes import FLOAT_DTYPES
from xclip_fast.lowrank import (
    add_low_rank_,
    as_inputs,
    cast_low_rank,
    from_inputs,
    low_rank_grads,
    low_rank_input_grad_,
    low_rank_linear,
)
from xclip_fast.versions import compiled_cpu_fp64_sdpa_is_broken

__all__ = [
    "attention",
    "packed_attention",
    "quick_gelu",
    "quick_gelu_mlp",
    "resolve_backend",
    "triton_limits",
    "triton_status",
    "autocast_dtype",
    "autocast_cast",
    "quick_gelu_resolved",
    "quick_gelu_grad",
    "quick_gelu_and_grad",
    "packed_kernel",
    "packed_forward",
    "packed_inputs",
    "packed_backward",
    "transforms_active",
    "forward_ad_active",
    "ATTENTION_BACKENDS",
    "MODULE_BACKENDS",
]

ATTENTION_BACKENDS = ("auto", "triton", "torch")
MODULE_BACKENDS = ("auto", "triton", "torch", "reference")

_import_error: str | None = None
try:  # triton is an optional dependency on platforms without wheels
    from xclip_fast import library as _lib
    from xclip_fast.kernels.attention import MAX_HEAD_DIM as _MAX_HEAD_DIM
except Exception as exc:  # pragma: no cover - depends on the platform
    _lib = _MAX_HEAD_DIM = None
    _import_error = f"{type(exc).__name__}: {exc}"


def _interpreting() -> bool:
    return _lib is not None and _lib.INTERPRETING


def forward_ad_active() -> bool:
    """Whether forward-mode AD may be running: a ``torch.autograd.forward_ad.dual_level`` is open
    (``torch.func.jvp``/``jacfwd``/``hessian`` open one too)."""
    return _fwAD._current_level >= 0


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``,
    ``vmap``, ``hessian``) or forward-mode AD is running around this call. The registered
    operators' autograd is not visible to ``torch.func`` (PyTorch builds it as an autograd.Function
    without ``setup_context``) and has no forward-mode formula, so such calls run on the torch
    backend, whose operations all support these transforms."""
    return forward_ad_active() or torch._C._are_functorch_transforms_active()


# ------------------------------------------------------------------------------------------------
# the backend resolver
# ------------------------------------------------------------------------------------------------
def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device`` (default: this machine), and why not."""
    if _lib is None:
        return False, f"triton does not import ({_import_error})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if _interpreting():
        if device.type == "cpu":
            return True, "TRITON_INTERPRET=1 (the CPU interpreter)"
        return False, ("triton runs in interpreter mode (TRITON_INTERPRET=1), which needs CPU tensors; "
                       f"got {device.type} tensors")
    if device.type == "cuda" and torch.cuda.is_available():
        return True, "CUDA device"
    return False, ("triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                   f"imported, for CPU tensors); got {device.type} tensors")


def triton_limits(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None, *,
                  attn_mask: bool = False, dropout: bool = False) -> list[str]:
    """Every reason the Triton kernels cannot run this call (empty when they can)."""
    ok, why = triton_status(device)
    reasons = [] if ok else [why]
    if head_dim is not None and _MAX_HEAD_DIM is not None and head_dim > _MAX_HEAD_DIM:
        reasons.append(f"head dim D={head_dim} exceeds the triton kernels' maximum {_MAX_HEAD_DIM}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the triton kernels (supported: {FLOAT_DTYPES})")
    if dtype == torch.bfloat16 and head_dim is not None and _interpreting():
        reasons.append("bf16 matrix products are wrong in Triton's CPU interpreter (TRITON_INTERPRET=1); bf16 "
                       "runs on CUDA")
    if attn_mask:
        reasons.append("an attention mask is not supported by the triton kernels")
    if dropout:
        reasons.append("attention dropout is not supported by the triton kernels")
    if transforms_active():
        reasons.append("torch.func transforms (grad, jacrev, vmap, jvp, jacfwd, hessian) and forward-mode AD are "
                       "not supported by the triton kernels; backend='torch' runs them")
    return reasons


def resolve_backend(backend: str, device: torch.device, *, dtype: torch.dtype | None = None,
                    head_dim: int | None = None, attn_mask: bool = False, dropout: bool = False,
                    allowed=ATTENTION_BACKENDS) -> str:
    """The backend that runs a call: the one place where ``"auto"`` is decided.

    ``"auto"`` gives ``"triton"`` for CUDA tensors when the kernels can run the call and ``"torch"``
    otherwise (head dim over 128, a mask, attention dropout, a ``torch.func`` transform or
    forward-mode AD, no triton); an explicit ``"triton"``
    that cannot run raises a ``ValueError`` listing every reason. ``dtype``/``head_dim`` omitted:
    not checked (the MLP has no head dim).
    """
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend in ("torch", "reference"):
        return backend
    reasons = triton_limits(device, dtype, head_dim, attn_mask=attn_mask, dropout=dropout)
    if backend == "auto":
        return "triton" if device.type == "cuda" and not reasons else "torch"
    if reasons:
        raise ValueError("backend='triton' cannot run this call: " + "; ".join(reasons)
                         + " (backend='auto' falls back to 'torch')")
    return "triton"


# ------------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------------
def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_cast(dtype: torch.dtype | None, *tensors):
    """Autocast's rule for matrix products: floating tensors other than fp64 go to ``dtype``
    (None: unchanged); None entries stay None."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, extra_k, extra_v, scale, attn_mask=None, dropout_p=0.0):
    """SDPA on ``[B, S, H, D]`` tensors; the extra token is appended to the keys/values only.

    Under forward-mode AD the attention is written out (``_math_attention``): PyTorch's fused SDPA
    kernels (CPU flash, CUDA flash and efficient) have no forward-mode formula. So it is for float64 on
    the CPU under ``torch.compile`` with torch < 2.13 (a bug of those releases, see
    :func:`xclip_fast.versions.compiled_cpu_fp64_sdpa_is_broken`)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views
    if extra_k is not None:
        k = torch.cat([k, extra_k.unsqueeze(2)], dim=2)
        v = torch.cat([v, extra_v.unsqueeze(2)], dim=2)
    if forward_ad_active() or compiled_cpu_fp64_sdpa_is_broken(q):
        o = _math_attention(q, k, v, scale, attn_mask, dropout_p)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2)


def _math_attention(q, k, v, scale, attn_mask=None, dropout_p=0.0):
    """``softmax(scale q k^T + mask) v`` on ``[B, H, S, D]``, in plain differentiable operations
    (what SDPA's math backend computes; every autograd mode and ``torch.func`` transform applies)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    p = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


# ------------------------------------------------------------------------------------------------
# packed attention as an explicit forward and backward (for autograd Functions that own the layer)
# ------------------------------------------------------------------------------------------------
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_CPU_FP64 = torch.zeros(0, dtype=torch.float64)  # (what compiled_cpu_fp64_sdpa_is_broken reads: dtype, device)


def packed_kernel(backend: str, device: torch.device, dtype: torch.dtype, dropout_p: float) -> str | None:
    """The explicit forward/backward pair (:func:`packed_forward`, :func:`packed_backward`) that runs a
    packed attention on the resolved ``backend``: ``"triton"`` (the operators of
    :mod:`xclip_fast.library`), ``"cpu"`` (the torch backend on CPU tensors: PyTorch's CPU flash
    attention), or None (SDPA under autograd only: the torch backend on other devices, attention
    dropout, which neither pair has, ``torch.func`` transforms and forward-mode AD, and float64 CPU
    attention traced by the releases whose compiled one is broken)."""
    if dropout_p > 0.0 or transforms_active():
        return None
    if backend == "triton":
        return "triton"
    if device.type == "cpu" and not (dtype == torch.float64 and compiled_cpu_fp64_sdpa_is_broken(_CPU_FP64)):
        return "cpu"
    return None


def _heads_first(qkv: torch.Tensor, extra_kv: torch.Tensor | None):
    """``q, k, v`` as ``(B, H, S, D)`` views of ``qkv`` and, with the extra token, ``k, v`` with it
    appended (new tensors)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    if extra_kv is not None:
        ek, ev = extra_kv.unbind(1)
        k, v = torch.cat([k, ek.unsqueeze(2)], dim=2), torch.cat([v, ev.unsqueeze(2)], dim=2)
    return q, k, v


def packed_forward(kernel: str, qkv: torch.Tensor, extra_kv, scale: float, attn_mask=None, heads=None):
    """``(out, lse)`` of a packed attention (see :func:`packed_kernel`), not recorded by autograd:
    ``out (B, S, H, D)`` laid out like the triton operator's (seq-first when ``qkv`` is, where the
    out-projection reads it without a copy), ``lse (B, H, S)``. ``heads``: the CPU kernel's inputs
    from :func:`packed_inputs`, when the caller has them (a backward that recomputes the attention)."""
    if kernel == "triton":
        return torch.ops.xclip_fast.packed_attention_fwd(qkv, extra_kv, scale)
    o, lse = _FLASH_CPU(*(heads or _heads_first(qkv, extra_kv)), 0.0, False, attn_mask=attn_mask, scale=scale)
    if qkv.stride(0) < qkv.stride(1):  # seq-first
        return o.permute(2, 0, 1, 3).contiguous().transpose(0, 1), lse
    return o.transpose(1, 2).contiguous(), lse


def packed_inputs(kernel: str, qkv: torch.Tensor, extra_kv):
    """What the CPU kernel reads (q, k, v heads first, the extra token appended), for
    :func:`packed_forward` and :func:`packed_backward` to share; None for the triton kernel."""
    return _heads_first(qkv, extra_kv) if kernel == "cpu" else None


def packed_backward(kernel: str, qkv: torch.Tensor, extra_kv, out, lse, dout, scale: float, attn_mask=None,
                    heads=None):
    """``(dqkv, dextra_kv)`` for :func:`packed_forward`'s results: ``dqkv`` one buffer in ``qkv``'s
    layout (a permutation of the in-projection's output), ``dextra_kv`` None without the token."""
    if kernel == "triton":
        dqkv, dextra = torch.ops.xclip_fast.packed_attention_bwd(qkv, extra_kv, out, lse, dout, scale)
        return dqkv, (dextra if extra_kv is not None else None)
    q, k, v = heads or _heads_first(qkv, extra_kv)
    dq, dk, dv = _FLASH_CPU_BWD(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, 0.0, False,
                                attn_mask=attn_mask, scale=scale)
    S = qkv.shape[1]
    grads = (dq, dk[:, :, :S], dv[:, :, :S])
    if qkv.stride(0) < qkv.stride(1):
        dqkv = torch.stack([g.permute(2, 0, 1, 3) for g in grads], dim=2).transpose(0, 1)
    else:
        dqkv = torch.stack([g.transpose(1, 2) for g in grads], dim=2)
    return dqkv, (None if extra_kv is None else torch.stack([dk[:, :, S], dv[:, :, S]], dim=1))


class _PackedCPUAttention(torch.autograd.Function):
    """Packed attention on the torch backend for CPU tensors with an extra token, keeping for
    backward what the triton operator keeps: ``qkv``, the extra token, the output and the
    log-sum-exp. Autograd on SDPA would also keep the keys and values with the token appended (two
    more d-wide rows per token); they are rebuilt in backward instead."""

    @staticmethod
    def forward(ctx, qkv, extra_kv, scale, attn_mask):
        out, lse = packed_forward("cpu", qkv, extra_kv, scale, attn_mask)
        ctx.save_for_backward(qkv, extra_kv, out, lse, attn_mask)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qkv, extra_kv, out, lse, attn_mask = ctx.saved_tensors
        return (*packed_backward("cpu", qkv, extra_kv, out, lse, dout, ctx.scale, attn_mask), None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None, *,
              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention with an optional extra key/value token per sequence.

    ``out[b, i, h] = softmax_j(scale * q[b,i,h] . [k[b,:,h]; extra_k[b,h]]) @ [v[b,:,h]; extra_v[b,h]]``

    Args:
        q: ``(B, Sq, H, D)`` queries.
        k, v: ``(B, Sk, H, D)`` keys and values (``Sk`` may differ from ``Sq``).
        extra_k, extra_v: ``(B, H, D)`` one extra key/value per sequence, or both None. X-CLIP's
            message token enters the intra-frame attention this way, without concatenation.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    Any strides are accepted; tensors whose last dimension is not contiguous are copied. The
    result is ``(B, Sq, H, D)`` and differentiable in every tensor argument (first order; the
    triton backend refuses second-order gradients with an error). Floating dtypes fp16, bf16, fp32
    and fp64 (all inputs the same); fp32 runs exact fp32 dot products unless TF32 is enabled in
    PyTorch (``torch.set_float32_matmul_precision("high")``). Under ``torch.autocast`` the inputs
    are cast to the autocast dtype first. Sequences never see each other's values: a NaN in one
    sequence leaves the others finite. ``torch.func`` transforms (``grad``, ``jacrev``, ``vmap``,
    ``jvp``, ``jacfwd``) and forward-mode AD run on the torch backend (``"auto"`` picks it;
    ``"triton"`` refuses them).

    Raises:
        ValueError: wrong ranks, mismatched shapes, dtypes or devices, only one of
            ``extra_k``/``extra_v``, a scale that is not finite, an unknown backend, or a call the
            chosen backend cannot run (naming the values).
        TypeError: an argument that is not a tensor.
    """
    problems = attention_problems(q, k, v, extra_k, extra_v)
    raise_problems(scale_problems(scale, problems), "attention")
    D = q.shape[-1]
    cast = autocast_dtype(q.device)
    q, k, v, extra_k, extra_v = autocast_cast(cast, q, k, v, extra_k, extra_v)
    backend = resolve_backend(backend, q.device, dtype=q.dtype, head_dim=D)
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return _sdpa(q, k, v, extra_k, extra_v, scale)
    return torch.ops.xclip_fast.attention_fwd(q, k, v, extra_k, extra_v, scale)[0]


def packed_attention(qkv: torch.Tensor, extra_kv: torch.Tensor | None = None, *, scale: float | None = None,
                     backend: str = "auto", attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention over a packed in-projection output (the modules' entry point).

    ``qkv: (B, S, 3, H, D)`` (any strides; typically the seq-first GEMM output ``(S, B, 3*d)``
    viewed and transposed), ``extra_kv: (B, 2, H, D)`` one extra key/value per sequence, or None.
    Returns ``(B, S, H, D)``; on the triton backend its memory follows ``qkv`` (seq-first in,
    seq-first out) so the out-projection reads it without a copy, and the gradient of ``qkv``
    comes back as one buffer. ``attn_mask`` (additive, broadcastable to ``(B, H, S, S[+1])``) and
    ``dropout_p`` are honoured by the torch backend; ``"auto"`` picks it for them, ``"triton"``
    refuses them. Checks, dtypes, autocast and ``torch.func`` as in :func:`attention`.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    problems = packed_problems(qkv, extra_kv)
    raise_problems(scale_problems(scale, problems), "packed_attention")
    D = qkv.shape[-1]
    qkv, extra_kv = autocast_cast(autocast_dtype(qkv.device), qkv, extra_kv)
    backend = resolve_backend(backend, qkv.device, dtype=qkv.dtype, head_dim=D, attn_mask=attn_mask is not None,
                              dropout=dropout_p > 0.0)
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        if attn_mask is not None:
            attn_mask = attn_mask.to(qkv.dtype)
        if extra_kv is not None and torch.is_grad_enabled() and (qkv.requires_grad or extra_kv.requires_grad) \
                and packed_kernel(backend, qkv.device, qkv.dtype, dropout_p) == "cpu":
            # (without the token autograd on SDPA keeps views of qkv only)
            return _PackedCPUAttention.apply(qkv, extra_kv, scale, attn_mask)
        q, k, v = qkv.unbind(2)
        ek, ev = extra_kv.unbind(1) if extra_kv is not None else (None, None)
        return _sdpa(q, k, v, ek, ev, scale, attn_mask=attn_mask, dropout_p=dropout_p)
    return torch.ops.xclip_fast.packed_attention_fwd(qkv, extra_kv, scale)[0]


# ------------------------------------------------------------------------------------------------
# the MLP: fc1 -> QuickGELU -> fc2, saving only what backward needs
# ------------------------------------------------------------------------------------------------
_QG = 1.702


def quick_gelu(h: torch.Tensor, backend: str = "auto", *, inplace: bool = False) -> torch.Tensor:
    """``h * sigmoid(1.702 h)`` (QuickGELU), one pass on the triton backend; ``inplace`` lets the torch
    backend write into ``h`` in eager mode (use the result: under torch.compile and on the triton
    backend a new tensor comes back). Differentiable:
    while autograd records ``h`` it saves ``h`` only (never in place)."""
    backend = resolve_backend(backend, h.device, dtype=h.dtype)
    if torch.is_grad_enabled() and h.requires_grad and backend == "torch":
        return _QuickGELUFunction.apply(h)
    return quick_gelu_resolved(h, backend, inplace=inplace)


def quick_gelu_resolved(h: torch.Tensor, backend: str, *, inplace: bool = False) -> torch.Tensor:
    """:func:`quick_gelu` with ``backend`` already resolved (``"triton"`` or ``"torch"``), not recorded
    by autograd: for code that writes its own backward (:func:`quick_gelu_grad`)."""
    if backend == "triton":
        return torch.ops.xclip_fast.quick_gelu(h)
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
        return torch.ops.xclip_fast.quick_gelu_backward(h, dg)
    hs = torch.mul(h, _QG)
    s = torch.sigmoid(hs)
    # dg s (1 - s) 1.702 h + dg s, in four passes
    return torch.ops.aten.sigmoid_backward(dg, s).mul_(hs).addcmul_(dg, s)


def quick_gelu_and_grad(h: torch.Tensor, dg: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """QuickGELU of ``h`` and :func:`quick_gelu_grad` of ``dg`` together (``backend`` resolved): the
    torch backend computes the sigmoid once for both."""
    if backend == "triton":
        return torch.ops.xclip_fast.quick_gelu(h), torch.ops.xclip_fast.quick_gelu_backward(h, dg)
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
        da2, dbl2 = low_rank_grads(dy2, g, low_rank_input_grad_(dy2, dg, lora2), lora2, need_a2, need_bl2)
        if need_dh:
            dh = quick_gelu_grad(h, dg, ctx.backend)
            if need_w1:
                dw1 = dh.t() @ x2
            if need_b1 and ctx.has_b1:
                db1 = dh.sum(0)
            dx2 = dh @ w1 if need_x else None
            da1, dbl1 = low_rank_grads(dh, x2, low_rank_input_grad_(dh, dx2, lora1), lora1, need_a1, need_bl1)
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
    ``torch.func`` transform or forward-mode AD the MLP runs as plain operations (``linear``,
    ``sigmoid``, ``linear``), which every transform supports.
    """
    if transforms_active():
        if backend == "triton":
            resolve_backend(backend, x.device)  # raises, naming the reason
        h = low_rank_linear(x, w1, b1, lora1)
        return low_rank_linear(h * torch.sigmoid(_QG * h), w2, b2, lora2)
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
