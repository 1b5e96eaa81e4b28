"""Attention ops: input checks, backend dispatch and the autograd bindings of the Triton kernels.

Backends:

- ``"triton"``: the kernels of ``xclip_fast.kernels.attention`` (CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention``, any device.
- ``"auto"``: ``"triton"`` for CUDA tensors when triton imports, ``"torch"`` otherwise.

Modules additionally know ``"reference"`` (the original computation, see ``reference.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "packed_attention",
    "quick_gelu_mlp",
    "resolve_backend",
    "triton_status",
    "ATTENTION_BACKENDS",
    "MODULE_BACKENDS",
]

ATTENTION_BACKENDS = ("auto", "triton", "torch")
MODULE_BACKENDS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_triton_import_error: str | None = None
try:  # triton is an optional dependency on platforms without wheels
    from xclip_fast.kernels import attention as _tk
    from xclip_fast.kernels import quick_gelu as _tg
except Exception as exc:  # pragma: no cover - depends on the platform
    _tk = _tg = None
    _triton_import_error = f"{type(exc).__name__}: {exc}"


def _interpreting() -> bool:
    # triton decides at import time: kernels are interpreted iff TRITON_INTERPRET was set then
    return _tk is not None and type(_tk._attention_fwd_kernel).__name__ == "InterpretedFunction"


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device`` (default: this machine), and why not."""
    if _tk is None:
        return False, f"triton does not import ({_triton_import_error})"
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


def resolve_backend(backend: str, device: torch.device, *, allowed=ATTENTION_BACKENDS) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend for tensors on ``device``."""
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_status(device)[0]:
            return "triton"
        return "torch"
    if backend == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise ValueError(f"backend='triton' cannot run here: {why}")
    return backend


def _allow_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


# ------------------------------------------------------------------------------------------------
# autograd bindings
# ------------------------------------------------------------------------------------------------
def _empty_out(like: torch.Tensor) -> torch.Tensor:
    """An output ``[B, S, H, D]`` laid out like ``like`` when ``like`` is a seq-first view."""
    B, S, H, D = like.shape
    if like.stride(0) < like.stride(1):  # seq-first memory: keep it so the next GEMM reads it as is
        return torch.empty(S, B, H, D, dtype=like.dtype, device=like.device).transpose(0, 1)
    return torch.empty(B, S, H, D, dtype=like.dtype, device=like.device)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionFunction(torch.autograd.Function):
    """Triton attention with separate q, k, v (and optional extra k, v) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, scale: float):
        B, SQ, H, _ = q.shape
        o = _empty_out(q)
        lse = torch.empty(B, H, SQ, dtype=_lse_dtype(q.dtype), device=q.device)
        tf32 = _allow_tf32()
        _tk.attention_fwd(q, k, v, extra_k, extra_v, o, lse, scale, tf32)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, o, lse)
        ctx.scale, ctx.tf32 = scale, tf32
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, ek, ev, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dek = torch.empty_like(ek) if ek is not None else None
        dev = torch.empty_like(ev) if ev is not None else None
        _tk.attention_bwd(q, k, v, ek, ev, o, lse, do, dq, dk, dv, dek, dev, ctx.scale, ctx.tf32)
        return dq, dk, dv, dek, dev, None


class PackedAttentionFunction(torch.autograd.Function):
    """Triton attention reading q, k, v out of one packed in-projection output.

    ``qkv: [B, S, 3, H, D]`` (any strides, typically a view of a seq-first ``(S, B, 3*d)`` GEMM
    output), ``extra_kv: [B, 2, H, D]`` or None. The gradient is written straight into one
    ``dqkv`` buffer of the same layout, so autograd never scatters three slices into zeros.
    """

    @staticmethod
    def forward(ctx, qkv, extra_kv, scale: float):
        q, k, v = qkv.unbind(2)
        ek, ev = extra_kv.unbind(1) if extra_kv is not None else (None, None)
        B, S, H, _ = q.shape
        o = _empty_out(q)
        lse = torch.empty(B, H, S, dtype=_lse_dtype(q.dtype), device=q.device)
        tf32 = _allow_tf32()
        _tk.attention_fwd(q, k, v, ek, ev, o, lse, scale, tf32)
        ctx.save_for_backward(qkv, extra_kv, o, lse)
        ctx.scale, ctx.tf32 = scale, tf32
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, extra_kv, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dqkv = torch.empty_like(qkv)
        if dqkv.stride(-1) != 1:
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        q, k, v = qkv.unbind(2)
        dq, dk, dv = dqkv.unbind(2)
        if extra_kv is not None:
            dextra_kv = torch.empty(extra_kv.shape, dtype=extra_kv.dtype, device=extra_kv.device)
            ek, ev = extra_kv.unbind(1)
            dek, dev = dextra_kv.unbind(1)
        else:
            dextra_kv = ek = ev = dek = dev = None
        _tk.attention_bwd(q, k, v, ek, ev, o, lse, do, dq, dk, dv, dek, dev, ctx.scale, ctx.tf32)
        return dqkv, dextra_kv, None


# ------------------------------------------------------------------------------------------------
# torch backend
# ------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, extra_k, extra_v, scale, attn_mask=None):
    """SDPA on ``[B, S, H, D]`` tensors; the extra token is appended to the keys/values only."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views
    if extra_k is not None:
        k = torch.cat([k, extra_k.unsqueeze(2)], dim=2)
        v = torch.cat([v, extra_v.unsqueeze(2)], dim=2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return o.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# checks and the functional API
# ------------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_triton_support(head_dim: int, dtype: torch.dtype, problems: list) -> None:
    if _tk is None:
        return
    if head_dim > _tk.MAX_HEAD_DIM:
        problems.append(f"head dim D={head_dim} exceeds the triton backend's maximum "
                        f"{_tk.MAX_HEAD_DIM} (use backend='torch')")
    if dtype not in _tk.SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} is not supported by the triton backend")


def _raise(problems: list, what: str) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


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
    result is ``(B, Sq, H, D)`` and differentiable in every tensor argument. Floating dtypes
    fp16, bf16, fp32 and fp64 (all inputs the same); fp32 runs exact fp32 dot products unless
    TF32 is enabled in PyTorch (``torch.set_float32_matmul_precision("high")``).

    Raises:
        ValueError: wrong ranks, mismatched shapes, dtypes or devices, only one of
            ``extra_k``/``extra_v``, an unknown backend, or a problem the chosen backend cannot
            run (naming the values).
    """
    problems = []
    named = {"q": q, "k": k, "v": v}
    if (extra_k is None) != (extra_v is None):
        problems.append("extra_k and extra_v must be given together "
                        f"(got extra_k={'a tensor' if extra_k is not None else None}, "
                        f"extra_v={'a tensor' if extra_v is not None else None})")
    elif extra_k is not None:
        named.update(extra_k=extra_k, extra_v=extra_v)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("q", "k", "v"):
        if named[name].dim() != 4:
            problems.append(f"{name} must be 4-D (B, S, H, D), got shape {tuple(named[name].shape)}")
    for name in ("extra_k", "extra_v"):
        if name in named and named[name].dim() != 3:
            problems.append(f"{name} must be 3-D (B, H, D), got shape {tuple(named[name].shape)}")
    _raise(problems, "attention")

    B, SQ, H, D = q.shape
    if k.shape != v.shape:
        problems.append(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2:] != (H, D):
        problems.append(f"k must be (B={B}, Sk, H={H}, D={D}), got {tuple(k.shape)}")
    for name in ("extra_k", "extra_v"):
        if name in named and tuple(named[name].shape) != (B, H, D):
            problems.append(f"{name} must be (B={B}, H={H}, D={D}), got {tuple(named[name].shape)}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        problems.append(f"every dimension must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        problems.append(f"dtypes differ: {', '.join(f'{n}={d}' for n, d in dtypes.items())}")
    if q.dtype not in _FLOAT_DTYPES:
        problems.append(f"dtype must be one of {_FLOAT_DTYPES}, got {q.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        problems.append(f"devices differ: {', '.join(f'{n}={d}' for n, d in devices.items())}")
    _raise(problems, "attention")

    backend = resolve_backend(backend, q.device)
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return _sdpa(q, k, v, extra_k, extra_v, scale)
    _check_triton_support(D, q.dtype, problems)
    _raise(problems, "attention")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if extra_k is not None:
        extra_k, extra_v = _last_dim_contiguous(extra_k), _last_dim_contiguous(extra_v)
    return AttentionFunction.apply(q, k, v, extra_k, extra_v, scale)


def packed_attention(qkv: torch.Tensor, extra_kv: torch.Tensor | None = None, *,
                     scale: float | None = None, backend: str, attn_mask=None) -> torch.Tensor:
    """Self-attention over a packed in-projection output (the modules' entry point).

    ``qkv: (B, S, 3, H, D)`` (any strides with a contiguous last dim; typically the seq-first GEMM
    output ``(S, B, 3*d)`` viewed and transposed), ``extra_kv: (B, 2, H, D)`` one extra key/value
    per sequence, or None. Returns ``(B, S, H, D)``; on the triton backend its memory follows
    ``qkv`` (seq-first in, seq-first out) so the out-projection reads it without a copy.
    ``attn_mask`` (additive, broadcastable to ``(B, H, S, S[+1])``) is honoured by the torch
    backend only; ``backend`` must already be resolved (``"triton"`` or ``"torch"``).
    """
    D = qkv.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if backend == "torch":
        q, k, v = qkv.unbind(2)
        ek, ev = extra_kv.unbind(1) if extra_kv is not None else (None, None)
        return _sdpa(q, k, v, ek, ev, scale, attn_mask=attn_mask)
    if backend != "triton":
        raise ValueError(f"packed_attention: backend must be 'triton' or 'torch', got {backend!r}")
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported by the triton backend (use backend='torch')")
    problems = []
    _check_triton_support(D, qkv.dtype, problems)
    _raise(problems, "packed_attention")
    return PackedAttentionFunction.apply(_last_dim_contiguous(qkv), extra_kv, scale)


# ------------------------------------------------------------------------------------------------
# the MLP: c_fc -> QuickGELU -> c_proj, saving only what backward needs
# ------------------------------------------------------------------------------------------------
_QG = 1.702


def _gelu(h: torch.Tensor, backend: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """QuickGELU of ``h`` into ``out`` (a new tensor by default; ``out=h`` works in place)."""
    if backend == "triton":
        return _tg.quick_gelu_fwd(h, h if out is h else (out if out is not None else torch.empty_like(h)))
    if out is h:
        h.mul_(torch.mul(h, _QG).sigmoid_())
        return h
    return torch.mul(h, _QG).sigmoid_().mul_(h)


def _gelu_backward(h: torch.Tensor, dg: torch.Tensor, backend: str) -> torch.Tensor:
    """d/dh of QuickGELU times ``dg``, written into ``dg`` (the sigmoid is recomputed from ``h``)."""
    if backend == "triton":
        return _tg.quick_gelu_bwd(h, dg, dg)
    s = torch.mul(h, _QG).sigmoid_()
    # s + 1.702 h s (1 - s)
    slope = torch.sub(1.0, s).mul_(s).mul_(h).mul_(_QG).add_(s)
    return dg.mul_(slope)


class QuickGELUMLPFunction(torch.autograd.Function):
    """``c_proj(QuickGELU(c_fc(x)))`` saving ``x`` and the pre-activation only.

    Autograd on the plain modules keeps the pre-activation, the sigmoid and the activation output
    (three 4d-wide tensors per token); this keeps one and recomputes the rest in backward.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, backend: str):
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.addmm(b1, x2, w1.t()) if b1 is not None else x2 @ w1.t()
        g = _gelu(h, backend)
        y = torch.addmm(b2, g, w2.t()) if b2 is not None else g @ w2.t()
        ctx.save_for_backward(x2, h, w1, w2)
        ctx.backend, ctx.has_b1, ctx.has_b2, ctx.x_shape = backend, b1 is not None, b2 is not None, x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:
            dw2 = dy2.t() @ _gelu(h, ctx.backend)
        if need_b2 and ctx.has_b2:
            db2 = dy2.sum(0)
        if need_x or need_w1 or need_b1:
            dh = _gelu_backward(h, dy2 @ w2, ctx.backend)
            if need_w1:
                dw1 = dh.t() @ x2
            if need_b1 and ctx.has_b1:
                db1 = dh.sum(0)
            if need_x:
                dx = (dh @ w1).view(ctx.x_shape)
        return dx, dw1, db1, dw2, db2, None


def _mlp_linears(mlp):
    """``(fc1, fc2)`` when ``mlp`` is CLIP's Linear -> QuickGELU -> Linear (official or Hugging
    Face), else None (the module is then simply called)."""
    from xclip_fast.reference import QuickGELU

    if isinstance(mlp, torch.nn.Sequential) and [n for n, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]:
        if type(mlp.gelu) is QuickGELU and type(mlp.c_fc) is torch.nn.Linear and type(mlp.c_proj) is torch.nn.Linear:
            return mlp.c_fc, mlp.c_proj
    act = getattr(mlp, "activation_fn", None)
    if act is not None and type(act).__name__ == "QuickGELUActivation" and type(mlp).__name__ == "XCLIPMLP":
        return mlp.fc1, mlp.fc2
    return None


def quick_gelu_mlp(mlp: torch.nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Run CLIP's MLP module ``mlp`` on ``x`` with the activation fused and, in training, only the
    MLP input and pre-activation saved for backward. Unrecognised MLPs are called as they are."""
    linears = _mlp_linears(mlp)
    if linears is None or (backend == "triton" and _tg is None):
        return mlp(x)
    fc1, fc2 = linears
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in (*fc1.parameters(),
                                                                                     *fc2.parameters()))):
        return QuickGELUMLPFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, backend)
    h = F.linear(x, fc1.weight, fc1.bias)
    return F.linear(_gelu(h, backend, out=h), fc2.weight, fc2.bias)
