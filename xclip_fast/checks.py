"""Input checks shared by the Python API (:mod:`xclip_fast.ops`) and the registered operators
(:mod:`xclip_fast.library`): one place, so that a raw ``torch.ops.xclip_fast.*`` call and the
Python function report the same problem in the same words.

Every function returns a list of problems (empty when the inputs are fine); :func:`raise_problems`
turns them into one ``ValueError``. Only metadata is read (shapes, dtypes, devices), never values,
so the checks are cheap and run unchanged while ``torch.compile`` traces.
"""

from __future__ import annotations

import math

import torch

from xclip_fast.dtypes import FLOAT_DTYPES

__all__ = ["attention_problems", "packed_problems", "backward_problems", "same_problems", "scale_problems",
           "elementwise_problems", "raise_problems", "require_tensors"]


def require_tensors(named: dict, optional: tuple = ()) -> None:
    """A ``TypeError`` naming the first argument that is not a tensor (``optional`` ones may be None)."""
    for name, t in named.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def raise_problems(problems: list, what: str) -> None:
    """One ``ValueError`` listing every problem, prefixed by ``what`` (the function called)."""
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def same_problems(named: dict, problems: list) -> list:
    """One floating dtype of the supported ones, one device, for every tensor of ``named``."""
    tensors = [t for t in named.values() if t is not None]
    first = tensors[0]
    if first.dtype in FLOAT_DTYPES and all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        return problems  # (the common case, on every call, without building the messages)
    named = {n: t for n, t in named.items() if t is not None}
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        problems.append(f"dtypes differ: {', '.join(f'{n}={d}' for n, d in dtypes.items())}")
    first = next(iter(named.values()))
    if first.dtype not in FLOAT_DTYPES:
        problems.append(f"dtype must be one of {FLOAT_DTYPES}, got {first.dtype}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        problems.append(f"devices differ: {', '.join(f'{n}={d}' for n, d in devices.items())}")
    return problems


def scale_problems(scale, problems: list) -> list:
    """The softmax scale is a finite real number (None: the default ``D ** -0.5``)."""
    if scale is None:
        return problems
    try:
        value = float(scale)
    except (TypeError, ValueError):
        problems.append(f"scale must be a real number, got {type(scale).__name__}")
        return problems
    if isinstance(scale, bool) or not math.isfinite(value):
        problems.append(f"scale must be a finite real number, got {scale!r}")
    return problems


def attention_problems(q, k, v, extra_k=None, extra_v=None, max_head_dim: int | None = None) -> list:
    """Problems of ``attention(q, k, v, extra_k, extra_v)``: ``q: (B, Sq, H, D)``, ``k, v: (B, Sk,
    H, D)``, ``extra_*: (B, H, D)`` or both None; every dimension >= 1; one dtype and device.
    ``max_head_dim``: the kernels' limit on D (None: not checked). Raises ``TypeError`` for an
    argument that is not a tensor."""
    problems = []
    require_tensors({"q": q, "k": k, "v": v, "extra_k": extra_k, "extra_v": extra_v},
                    optional=("extra_k", "extra_v"))
    named = {"q": q, "k": k, "v": v}
    if (extra_k is None) != (extra_v is None):
        problems.append("extra_k and extra_v must be given together "
                        f"(got extra_k={'a tensor' if extra_k is not None else None}, "
                        f"extra_v={'a tensor' if extra_v is not None else None})")
    elif extra_k is not None:
        named.update(extra_k=extra_k, extra_v=extra_v)
    for name in ("q", "k", "v"):
        if named[name].dim() != 4:
            problems.append(f"{name} must be 4-D (B, S, H, D), got shape {tuple(named[name].shape)}")
    for name in ("extra_k", "extra_v"):
        if name in named and named[name].dim() != 3:
            problems.append(f"{name} must be 3-D (B, H, D), got shape {tuple(named[name].shape)}")
    if problems:
        return problems
    B, SQ, H, D = q.shape
    if k.shape != v.shape:
        problems.append(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2:] != (H, D):
        problems.append(f"k must be (B={B}, Sk, H={H}, D={D}), got {tuple(k.shape)}")
    for name in ("extra_k", "extra_v"):
        if name in named and tuple(named[name].shape) != (B, H, D):
            problems.append(f"{name} must be (B={B}, H={H}, D={D}), got {tuple(named[name].shape)}")
    if min(q.shape) < 1 or min(k.shape) < 1 or min(v.shape) < 1:
        problems.append(f"every dimension must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                        f"v {tuple(v.shape)}")
    if max_head_dim is not None and D > max_head_dim:
        problems.append(f"head dim D={D} exceeds the triton kernels' maximum {max_head_dim}")
    return same_problems(named, problems)


def packed_problems(qkv, extra_kv=None, max_head_dim: int | None = None) -> list:
    """Problems of ``packed_attention(qkv, extra_kv)``: ``qkv: (B, S, 3, H, D)``, ``extra_kv: (B, 2,
    H, D)`` or None; every dimension >= 1; one dtype and device."""
    if not isinstance(qkv, torch.Tensor) or (extra_kv is not None and not isinstance(extra_kv, torch.Tensor)):
        require_tensors({"qkv": qkv, "extra_kv": extra_kv}, optional=("extra_kv",))
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        return [f"qkv must be (B, S, 3, H, D), got {tuple(qkv.shape)}"]
    problems = []
    B, S, _, H, D = qkv.shape
    if extra_kv is not None and tuple(extra_kv.shape) != (B, 2, H, D):
        problems.append(f"extra_kv must be (B={B}, 2, H={H}, D={D}), got {tuple(extra_kv.shape)}")
    if min(qkv.shape) < 1:
        problems.append(f"every dimension must be >= 1, got qkv {tuple(qkv.shape)}")
    if max_head_dim is not None and D > max_head_dim:
        problems.append(f"head dim D={D} exceeds the triton kernels' maximum {max_head_dim}")
    return same_problems({"qkv": qkv, "extra_kv": extra_kv}, problems)


def backward_problems(q_shape: tuple, dtype: torch.dtype, device: torch.device, out, lse, grad,
                      lse_dtype: torch.dtype) -> list:
    """Problems of the saved forward results and the incoming gradient of an attention backward:
    ``out`` and ``grad`` ``(B, Sq, H, D)`` in the inputs' dtype, ``lse`` ``(B, H, Sq)`` in the
    accumulator dtype (``lse_dtype``), all on the inputs' device."""
    require_tensors({"out": out, "lse": lse, "grad": grad})
    problems = []
    B, SQ, H, _ = q_shape
    for name, t in (("out", out), ("grad", grad)):
        if tuple(t.shape) != tuple(q_shape):
            problems.append(f"{name} must have the queries' shape {tuple(q_shape)}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            problems.append(f"{name} must have the inputs' dtype {dtype}, got {t.dtype}")
    if tuple(lse.shape) != (B, H, SQ):
        problems.append(f"lse must be (B={B}, H={H}, Sq={SQ}), got {tuple(lse.shape)}")
    if lse.dtype != lse_dtype:
        problems.append(f"lse must be {lse_dtype} for {dtype} inputs (as the forward returns it), got {lse.dtype}")
    devices = {n: t.device for n, t in (("out", out), ("lse", lse), ("grad", grad))}
    if any(d != device for d in devices.values()):
        problems.append(f"out, lse and grad must be on the inputs' device {device}, got "
                        + ", ".join(f"{n}={d}" for n, d in devices.items()))
    return problems


def elementwise_problems(named: dict) -> list:
    """Tensors of one elementwise op: every tensor of ``named`` has the first one's shape, and one
    supported floating dtype and device."""
    require_tensors(named)
    problems = []
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.shape != first.shape:
            problems.append(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}")
    return same_problems(named, problems)
