"""Attention ops: input checks, the one backend resolver, autocast (the fused MLP: ``mlp.py``).

Backends:

- ``"triton"``: the kernels of ``xclip_fast.kernels`` through the operators of
  :mod:`xclip_fast.library` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
  triton was imported).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` and plain PyTorch, any device.
- ``"auto"``: ``"torch"`` wherever the kernels cannot run the call; on CUDA, the kernels for an attention
  only where they were measured to win on this GPU (:mod:`xclip_fast.autochoice`: the committed table,
  the user's own measurement), SDPA on the concatenated input otherwise; the MLP's QuickGELU kernel on
  CUDA. It never raises for something the torch backend can do.

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

from xclip_fast import autochoice
from xclip_fast.autochoice import Call
from xclip_fast.checks import attention_problems, packed_problems, raise_problems, scale_problems
from xclip_fast.dtypes import FLOAT_DTYPES
from xclip_fast.versions import compiled_cpu_fp64_sdpa_is_broken

__all__ = [
    "attention",
    "packed_attention",
    "resolve_backend",
    "attention_call",
    "triton_limits",
    "triton_status",
    "autocast_dtype",
    "autocast_cast",
    "packed_kernel",
    "packed_forward",
    "packed_inputs",
    "packed_backward",
    "transforms_active",
    "transform_reason",
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
    ``vmap``, ``hessian``) or forward-mode AD is running around this call. The fused Functions of
    the modules (:mod:`xclip_fast.fused`, the recompute levels) then stand aside for plain
    operations, and the attention operators are called through the Functions that ``torch.func``
    can differentiate (:mod:`xclip_fast.batching`)."""
    return forward_ad_active() or torch._C._are_functorch_transforms_active()


def _transform_kinds() -> list:
    """The kinds (``TransformType``) of the ``torch.func`` transforms around this call, innermost last."""
    if not torch._C._are_functorch_transforms_active():
        return []
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]


def transform_reason() -> str | None:
    """Why the triton kernels cannot run under the transforms around this call (None: they can).
    They run under ``vmap`` (batching rules) and one level of ``grad``/``vjp``/``jacrev`` (its
    per-sample gradients included); not under forward-mode AD, whose tangents a custom operator
    cannot see, nor under nested reverse mode, whose second derivative the backward kernels do not
    have."""
    if forward_ad_active():
        return ("forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not supported by "
                "the triton kernels; backend='torch' runs it")
    kinds = _transform_kinds()
    if not kinds:
        return None
    from torch._C._functorch import TransformType

    if any(kind not in (TransformType.Vmap, TransformType.Grad) for kind in kinds):
        names = sorted({str(kind).rsplit(".", 1)[-1] for kind in kinds})
        return (f"torch.func transforms other than vmap and grad/vjp/jacrev ({', '.join(names)} here) are not "
                "supported by the triton kernels; backend='torch' runs them")
    if kinds.count(TransformType.Grad) > 1:
        return ("nested torch.func.grad/vjp/jacrev (second-order gradients) are not supported by the triton kernels; "
                "backend='torch' runs them")
    return None


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
        reason = transform_reason()
        if reason is not None:
            reasons.append(reason)
    return reasons


def resolve_backend(backend: str, device: torch.device, *, dtype: torch.dtype | None = None,
                    head_dim: int | None = None, attn_mask: bool = False, dropout: bool = False,
                    allowed=ATTENTION_BACKENDS, call: Call | None = None, like: torch.Tensor | None = None) -> str:
    """The backend that runs a call: the one place where ``"auto"`` is decided.

    ``"auto"`` gives ``"torch"`` wherever the kernels cannot run the call (not CUDA, head dim over 128,
    a mask, attention dropout, forward-mode AD or a ``torch.func`` transform they cannot run, see
    :func:`transform_reason`; no triton). For an attention (``call``, its shape, and ``like``, one of
    its tensors) on CUDA it runs the kernels only where they were measured to win on this GPU, else
    SDPA (:mod:`xclip_fast.autochoice`); for the MLP's activation (no ``call``) it gives ``"triton"``
    on CUDA. An explicit ``"triton"`` that cannot run raises a ``ValueError`` listing every reason.
    ``dtype``/``head_dim`` omitted: not checked (the MLP has no head dim).
    """
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend in ("torch", "reference"):
        return backend
    reasons = triton_limits(device, dtype, head_dim, attn_mask=attn_mask, dropout=dropout)
    if backend == "auto":
        if reasons:
            return "torch"
        if call is None:
            return "triton" if device.type == "cuda" else "torch"
        return autochoice.choose(device, dtype, head_dim, call, like)
    if reasons:
        raise ValueError("backend='triton' cannot run this call: " + "; ".join(reasons)
                         + " (backend='auto' falls back to 'torch')")
    return "triton"


def _recorded(*tensors) -> bool:
    """Whether autograd records a call on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention_call(qkv: torch.Tensor, extra: torch.Tensor | None, training: bool | None = None) -> Call:
    """The :class:`~xclip_fast.autochoice.Call` of a packed attention ``qkv (B, S, 3, H, D)`` (``training``
    None: whether autograd records ``qkv`` or the extra token now)."""
    B, S, _, H, _ = qkv.shape
    return Call(B, S, S, H, extra is not None, _recorded(qkv, extra) if training is None else training)


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
    kernels (CPU flash, CUDA flash and efficient) have no forward-mode formula. So it is under any
    ``torch.func`` transform on the CPU: PyTorch's CPU flash kernel, forward and backward, has no
    batching rule (under ``vmap``, and in the backward that ``jacrev`` vmaps, it would run once per
    sample, with a warning; the CUDA kernels have one), and for float64 on
    the CPU under ``torch.compile`` with torch < 2.13 (a bug of those releases, see
    :func:`xclip_fast.versions.compiled_cpu_fp64_sdpa_is_broken`)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views
    if extra_k is not None:
        k = torch.cat([k, extra_k.unsqueeze(2)], dim=2)
        v = torch.cat([v, extra_v.unsqueeze(2)], dim=2)
    if (q.device.type == "cpu" and transforms_active()) or forward_ad_active() or compiled_cpu_fp64_sdpa_is_broken(q):
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
        if _lib.eager():  # (the caller built qkv and resolved the backend: no operator, no second check)
            return _lib.direct_packed_fwd(qkv, extra_kv, scale)
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
        bwd = _lib.direct_packed_bwd if _lib.eager() else torch.ops.xclip_fast.packed_attention_bwd
        dqkv, dextra = bwd(qkv, extra_kv, out, lse, dout, scale)
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
    sequence leaves the others finite. ``torch.func``: ``vmap`` and one level of ``grad``/``vjp``/
    ``jacrev`` (per-sample gradients ``vmap(grad(f))`` included) run on either backend, the triton
    kernels once per call whatever the vmapped size (:mod:`xclip_fast.batching`); forward-mode AD
    (``jvp``, ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``) and nested reverse mode run on the
    torch backend (``"auto"`` picks it; ``"triton"`` refuses them).

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
    call = Call(q.shape[0], q.shape[1], k.shape[1], q.shape[2], extra_k is not None,
                _recorded(q, k, v, extra_k, extra_v), False)
    backend = resolve_backend(backend, q.device, dtype=q.dtype, head_dim=D, call=call, like=q)
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return _sdpa(q, k, v, extra_k, extra_v, scale)
    if transforms_active():  # (vmap and one level of reverse mode: resolve_backend refused the others)
        return _lib.AttentionFunction.apply(q, k, v, extra_k, extra_v, scale)[0]
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
    call = attention_call(qkv, extra_kv)
    backend = resolve_backend(backend, qkv.device, dtype=qkv.dtype, head_dim=D, attn_mask=attn_mask is not None,
                              dropout=dropout_p > 0.0, call=call, like=qkv)
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
    if transforms_active():
        return _lib.PackedAttentionFunction.apply(qkv, extra_kv, scale)[0]
    if not call.training and _lib.eager():  # inference: the launch itself (checked above; nothing to record)
        return _lib.direct_packed_fwd(qkv, extra_kv, scale)[0]
    return torch.ops.xclip_fast.packed_attention_fwd(qkv, extra_kv, scale)[0]
