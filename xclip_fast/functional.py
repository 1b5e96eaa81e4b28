"""How one X-CLIP layer computes, on tensors and sub-modules: the one place the dataflow lives.

The modules (``blocks.py``, ``encoder.py``, ``hf.py``) own parameters and adapt their sub-module
names to :class:`Parts`; everything they compute goes through these functions.

One cross-frame layer, ``x: (l, N, d)`` seq-first (or ``(N, l, d)`` batch-first), ``N = b*T``:

1. :func:`message_path`: ``message_fc`` on each frame's class token, then attention among the T
   message tokens of each video (the only step that needs every frame of a video at once).
2. :func:`frame_path`: attention inside each frame over its l tokens plus its message token, which
   enters as one extra key/value (never concatenated to ``x``), then the MLP.

:func:`residual_path` is the MIT's plain pre-LN block. ``backend`` is the requested backend
(``"auto"``, ``"triton"`` or ``"torch"``); every op resolves it for its own call
(:func:`xclip_fast.ops.resolve_backend`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from xclip_fast.ops import packed_attention, quick_gelu, quick_gelu_mlp, transforms_active
from xclip_fast.submodules import hook_reason, linear_reason

__all__ = ["Parts", "FusedMLP", "in_projection", "project_qkv", "project_kv", "run_mlp", "message_path",
           "message_inputs", "message_attention", "frame_path", "frame_branches", "cross_frame_path",
           "residual_path", "no_drop", "RECOMPUTE_LEVELS", "check_recompute", "recompute_level",
           "records_autograd", "checkpointed", "run_recomputed", "mlp_width"]

RECOMPUTE_LEVELS = ("lean", "min", "none", "block")


class FusedMLP(NamedTuple):
    """CLIP's MLP as its two linear layers: ``fc2(QuickGELU(fc1(x)))``, run by the fused op."""

    fc1: nn.Linear
    fc2: nn.Linear


MLP = Union[FusedMLP, Callable[[torch.Tensor], torch.Tensor]]


class Parts(NamedTuple):
    """The sub-modules one layer is made of, whatever the module that owns them.

    Official blocks name them ``message_fc, message_ln, message_attn, ln_1, attn, ln_2, mlp``; the
    Hugging Face layer ``message_fc, message_ln, message_attn, layer_norm1, self_attn, layer_norm2,
    mlp``. Attention modules either hold a packed ``in_proj_weight`` (``nn.MultiheadAttention``) or
    separate ``q_proj/k_proj/v_proj`` (Hugging Face); both have ``num_heads`` and ``out_proj``.
    ``mlp`` is a :class:`FusedMLP` when the module is CLIP's Linear -> QuickGELU -> Linear (the
    adapters decide), else any callable (run as it is). The MIT's block leaves the message parts None.
    """

    message_fc: nn.Module | None
    message_ln: nn.Module | None
    message_attn: nn.Module | None
    ln_1: nn.Module
    attn: nn.Module
    ln_2: nn.Module
    mlp: MLP


def no_drop(branch: str, y: torch.Tensor) -> torch.Tensor:
    """The identity drop path (evaluation, or rate 0)."""
    return y


def in_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The packed ``(3d, d)`` in-projection weight and ``(3d,)`` bias (or None) of an attention
    module, or None when its projections must be called as modules.

    ``nn.MultiheadAttention`` holds them packed (the modules check it is plain before the fast path
    runs). Separate Hugging Face ``q_proj/k_proj/v_proj`` are concatenated on the fly (autograd
    reaches the originals) when all three are plain ``nn.Linear`` with biases alike; a wrapped or
    hooked projection (PEFT LoRA, ``prune``, a forward hook, see :mod:`xclip_fast.submodules`)
    gives None: :func:`project_qkv` then calls each one."""
    if getattr(attn, "in_proj_weight", None) is not None:
        return attn.in_proj_weight, attn.in_proj_bias
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if any(linear_reason(p) for p in projections) or len({p.bias is None for p in projections}) > 1:
        return None
    w = torch.cat([p.weight for p in projections])
    b = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projections])
    return w, b


def project_qkv(attn: nn.Module, packed, h: torch.Tensor) -> torch.Tensor:
    """``[q; k; v]`` of ``h`` along the last dim: one GEMM with ``packed = in_projection(attn)``, or
    the three projection modules called (``packed`` None) and concatenated in the same layout."""
    if packed is not None:
        return F.linear(h, *packed)
    return torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)


def project_kv(attn: nn.Module, packed, h: torch.Tensor) -> torch.Tensor:
    """``[k; v]`` of ``h`` only (the message token needs no query); see :func:`project_qkv`."""
    if packed is not None:
        w, b = packed
        d = w.shape[1]
        return F.linear(h, w[d:], b[d:] if b is not None else None)
    return torch.cat([attn.k_proj(h), attn.v_proj(h)], dim=-1)


def run_mlp(mlp: MLP, x: torch.Tensor, backend: str, *, recomputed: bool = False) -> torch.Tensor:
    """The MLP of ``parts`` on ``x``: fused for a :class:`FusedMLP`, else the module is called.

    ``recomputed``: the MLP runs inside a recomputed region (:func:`run_recomputed`), as separate
    operations (the second GEMM last), so that the recomputation in backward stops before the second
    GEMM: the fused op saves its tensors only after its forward, which would run that GEMM again."""
    if isinstance(mlp, FusedMLP):
        if recomputed:
            return F.linear(quick_gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias), backend), mlp.fc2.weight,
                            mlp.fc2.bias)
        return quick_gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, backend=backend)
    return mlp(x)


def mlp_width(mlp: MLP) -> int | None:
    """The hidden width of an MLP (the pre-activation the lean level keeps): a :class:`FusedMLP`'s, or
    the ``out_features`` of an MLP module's first layer (official ``c_fc``, Hugging Face ``fc1``, also
    when wrapped by PEFT); None when it cannot be told (then its first GEMM is recomputed)."""
    first = mlp.fc1 if isinstance(mlp, FusedMLP) else getattr(mlp, "c_fc", None) or getattr(mlp, "fc1", None)
    width = getattr(first, "out_features", None)
    return width if isinstance(width, int) else None


# ------------------------------------------------------------------------------------------------
# recomputation: what a layer keeps for its backward
# ------------------------------------------------------------------------------------------------
def check_recompute(level) -> str:
    """``level`` if it is one of :data:`RECOMPUTE_LEVELS`, else a ``ValueError``."""
    if level not in RECOMPUTE_LEVELS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_LEVELS}, got {level!r}")
    return level


def records_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records ``module`` on ``x``: grad mode on and ``x`` or a parameter requiring grad."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def recompute_level(level: str, x: torch.Tensor, module: nn.Module) -> str:
    """The level that applies to this call of ``module``: ``level`` while autograd records it,
    ``"none"`` otherwise (inference keeps nothing whatever the level), under ``torch.func``
    transforms or forward-mode AD (PyTorch's checkpoint does not support them), and for ``"lean"``
    and ``"min"`` when a sub-module has hooks (the recomputation would call them a second time, in
    backward; ``"block"`` does, as any whole-module checkpointing does)."""
    if level == "none" or transforms_active() or not records_autograd(x, module):
        return "none"
    if level != "block" and any(hook_reason(m) for m in module.modules() if m is not module):
        return "none"
    return level


def checkpointed(level: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, checkpointed whole when ``level`` is ``"block"`` (the original
    computation of a module, which keeps what its sub-modules keep at the other levels)."""
    if level == "block":
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


# outputs kept by the lean and min levels: the attention (out and log-sum-exp; recomputing it costs
# as much as its forward); every level keeps random numbers (drop path, dropout: reused when recomputed)
_ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward",
    "xclip_fast::packed_attention_fwd", "xclip_fast::attention_fwd",
})
_GEMMS = frozenset({"aten::mm", "aten::addmm"})


def _policy(attention: bool, widths: tuple):
    """The selective-checkpoint policy keeping random numbers, the attention (if ``attention``) and
    the outputs of the GEMMs whose output width is in ``widths`` (the in-projection 3d; the MLP's
    hidden width)."""

    def policy(ctx, op, *args, **kwargs):
        name = op.name() if hasattr(op, "name") else ""
        if name in _ATTENTION_OPS:  # (tagged random too, for their dropout: replayed by the RNG state)
            return CheckpointPolicy.MUST_SAVE if attention else CheckpointPolicy.PREFER_RECOMPUTE
        if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
            return CheckpointPolicy.MUST_SAVE
        if name in _GEMMS and args[-1].shape[-1] in widths:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def run_recomputed(level: str, body: Callable, *args, d: int, hidden: int | None):
    """``body(*args)`` for the backward at ``level`` (not ``"none"``): PyTorch's (selective)
    activation checkpointing, non-reentrant, keeping

    - ``"lean"``: the attention (out, log-sum-exp), the in-projection output (width ``3 * d``) and
      the MLP pre-activation (width ``hidden``); LayerNorms, QuickGELU and the out-projection
      (the residual after attention) are recomputed in backward;
    - ``"min"``: the attention and the in-projection output; the MLP's first GEMM is recomputed too;
    - ``"block"``: nothing but random numbers (the whole body is recomputed).

    ``body`` must end with the MLP's second GEMM (its output returned, the residual added outside):
    the recomputation stops at the last tensor the backward needs, before that GEMM. Random numbers
    drawn inside are kept, so drop path and dropout see the same values when recomputed.
    """
    widths = {"lean": (3 * d, hidden), "min": (3 * d,), "block": ()}[level]
    policy = _policy(level != "block", widths)
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(body, *args, use_reentrant=False, context_fn=context)


def _heads(attn: nn.Module, d: int) -> tuple[int, int]:
    H = attn.num_heads
    return H, d // H


def _dropout(attn: nn.Module) -> float:
    """The attention dropout of ``attn`` in training (``nn.MultiheadAttention`` and Hugging Face's
    attention both keep it as a float ``dropout``), 0 in evaluation."""
    p = getattr(attn, "dropout", 0.0)
    return float(p) if attn.training and isinstance(p, (int, float)) else 0.0


def message_path(cls: torch.Tensor, T: int, parts: Parts, backend: str, drop=no_drop, frame_parallel=None, *,
                 recomputed: bool = False) -> torch.Tensor:
    """Cross-frame fusion attention: ``cls: (b*T, d)`` class tokens -> ``(b*T, d)`` message tokens.

    Runs batch-first over videos ``(b, T, d)``; ``drop("message", y)`` applies the drop path of the
    message branch. This is the only part of a layer that needs every frame of a video at once:
    with ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`), ``cls`` holds this
    process's T frames of each video, the message-token inputs of the whole clip are gathered, the
    message attention runs over all of them and a copy of this process's rows is returned (so the
    whole clip's are freed). ``recomputed`` (frame parallel): the message attention, which every
    process runs for the whole clip, is checkpointed whole and keeps its gathered input only (one
    row per frame of the clip instead of five; recomputing it costs about 1/l of a layer's FLOPs).
    """
    N, d = cls.shape
    msg = message_inputs(cls, T, parts)
    if frame_parallel is None:
        return message_attention(msg, parts, backend, drop).view(N, d)
    attend = functools.partial(message_attention, parts=parts, backend=backend, drop=drop)
    full = frame_parallel.gather(msg, 1)
    full = checkpoint(attend, full, use_reentrant=False) if recomputed else attend(full)
    return frame_parallel.own(full, 1).clone(memory_format=torch.contiguous_format).view(N, d)


def message_inputs(cls: torch.Tensor, T: int, parts: Parts) -> torch.Tensor:
    """``message_fc`` of the class tokens ``cls: (b*T, d)`` as ``(b, T, d)`` (frame-local)."""
    N, d = cls.shape
    return parts.message_fc(cls).view(N // T, T, d)


def message_attention(msg: torch.Tensor, parts: Parts, backend: str, drop=no_drop) -> torch.Tensor:
    """The message tokens ``(b, T, d)`` after attention among the T message tokens of each video
    (pre-LN, residual, drop path of the message branch)."""
    b, T, d = msg.shape
    attn = parts.message_attn
    H, Dh = _heads(attn, d)
    qkv = project_qkv(attn, in_projection(attn), parts.message_ln(msg))
    a = packed_attention(qkv.view(b, T, 3, H, Dh), backend=backend, dropout_p=_dropout(attn))
    a = attn.out_proj(a.reshape(b, T, d))
    return msg + drop("message", a)


def _self_attention(x: torch.Tensor, parts: Parts, backend: str, batch_first: bool, attn_mask, msg=None):
    """``out_proj(attention(ln_1(x)))`` over each sequence of ``x`` (seq-first ``(S, B, d)`` or
    batch-first), with ``msg: (B, d)`` as one extra key/value per sequence when given. q, k, v stay
    in the in-projection GEMM's layout; the output comes back in the layout ``out_proj`` reads."""
    S, B, d = (x.shape[1], x.shape[0], x.shape[2]) if batch_first else x.shape
    attn = parts.attn
    H, Dh = _heads(attn, d)
    packed = in_projection(attn)
    qkv = project_qkv(attn, packed, parts.ln_1(x))
    qkv = qkv.view(B, S, 3, H, Dh) if batch_first else qkv.view(S, B, 3, H, Dh).transpose(0, 1)
    extra = None
    if msg is not None:
        # the original concatenates msg to x (promoting it to x's dtype under autocast) before ln_1
        extra = project_kv(attn, packed, parts.ln_1(msg.to(x.dtype))).view(B, 2, H, Dh)  # its k, v only
    o = packed_attention(qkv, extra, backend=backend, attn_mask=attn_mask, dropout_p=_dropout(attn))
    o = o.reshape(B, S, d) if batch_first else o.transpose(0, 1).reshape(S, B, d)
    return attn.out_proj(o)


def frame_path(x: torch.Tensor, msg: torch.Tensor, parts: Parts, backend: str, *, batch_first: bool = False,
               attn_mask: torch.Tensor | None = None, drop=no_drop) -> torch.Tensor:
    """Intra-frame attention over [frame tokens; message token], then the MLP, for each frame.

    ``x: (l, N, d)`` (or ``(N, l, d)`` with ``batch_first``), ``msg: (N, d)``. The message token is
    never concatenated: it is layer-normed on its own, only its key/value is projected, and it
    enters the attention as one extra key/value per frame. Frames are independent here, so any
    subset of frames (with their message tokens) can be updated on its own.
    ``drop(branch, y)`` with branch ``"attention"`` (``y`` has l token rows of the l+1 the official
    code drew for) or ``"mlp"``.
    """
    x, y = frame_branches(x, msg, parts, backend, batch_first=batch_first, attn_mask=attn_mask, drop=drop)
    return x + drop("mlp", y)


def frame_branches(x: torch.Tensor, msg: torch.Tensor | None, parts: Parts, backend: str, *,
                   batch_first: bool = False, attn_mask: torch.Tensor | None = None, drop=no_drop,
                   recomputed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x1, y)``: the residual after attention ``x1 = x + drop(attention)`` and the MLP's output
    ``y = mlp(ln_2(x1))`` before its drop path and residual (the layer returns ``x1 + drop(y)``).
    ``msg`` None: plain self-attention (the MIT). ``recomputed``: see :func:`run_mlp`."""
    x = x + drop("attention", _self_attention(x, parts, backend, batch_first, attn_mask, msg))
    return x, run_mlp(parts.mlp, parts.ln_2(x), backend, recomputed=recomputed)


def cross_frame_path(x: torch.Tensor, T: int, parts: Parts, backend: str, *, batch_first: bool = False,
                     attn_mask: torch.Tensor | None = None, drop=no_drop, recompute: str = "none",
                     frame_parallel=None) -> torch.Tensor:
    """A whole CCT layer on ``x: (l, b*T, d)`` (or ``(b*T, l, d)`` with ``batch_first``): the message
    path on the class tokens, then :func:`frame_path`; ``recompute``: the level that applies to
    this call (see :func:`run_recomputed`).

    ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`): ``x`` holds this process's T
    frames of each video. The message path (with its exchange) runs before the recomputed region,
    which gets this process's message tokens as an input, so a recomputation never repeats a
    collective; at every level but ``"none"`` it keeps only its gathered input (see
    :func:`message_path`)."""
    if frame_parallel is None:
        body = functools.partial(_cross_frame_branches, T=T, parts=parts, backend=backend, batch_first=batch_first,
                                 attn_mask=attn_mask, drop=drop)
        return _layer(body, x, parts, recompute, drop)
    msg = message_path(x[:, 0] if batch_first else x[0], T, parts, backend, drop, frame_parallel,
                       recomputed=recompute != "none")
    body = functools.partial(frame_branches, parts=parts, backend=backend, batch_first=batch_first,
                             attn_mask=attn_mask, drop=drop)
    return _layer(body, x, parts, recompute, drop, msg)


def _cross_frame_branches(x: torch.Tensor, T: int, parts: Parts, backend: str, batch_first: bool, attn_mask,
                          drop, recomputed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    msg = message_path(x[:, 0] if batch_first else x[0], T, parts, backend, drop)
    return frame_branches(x, msg, parts, backend, batch_first=batch_first, attn_mask=attn_mask, drop=drop,
                          recomputed=recomputed)


def residual_path(x: torch.Tensor, parts: Parts, backend: str, *, batch_first: bool = False,
                  attn_mask: torch.Tensor | None = None, recompute: str = "none") -> torch.Tensor:
    """Pre-LN self-attention + MLP (the MIT's block) on ``(S, B, d)`` or batch-first ``(B, S, d)``;
    ``recompute``: the level that applies to this call (see :func:`run_recomputed`)."""
    body = functools.partial(frame_branches, msg=None, parts=parts, backend=backend, batch_first=batch_first,
                             attn_mask=attn_mask)
    return _layer(body, x, parts, recompute, no_drop)


def _layer(branches: Callable, x: torch.Tensor, parts: Parts, recompute: str, drop, *inputs) -> torch.Tensor:
    """``x1 + drop("mlp", y)`` of ``(x1, y) = branches(x, *inputs, recomputed=...)``, run at ``recompute``."""
    if recompute == "none":
        x1, y = branches(x, *inputs, recomputed=False)
    else:
        body = functools.partial(branches, recomputed=True)
        x1, y = run_recomputed(recompute, body, x, *inputs, d=x.shape[-1], hidden=mlp_width(parts.mlp))
    return x1 + drop("mlp", y)
