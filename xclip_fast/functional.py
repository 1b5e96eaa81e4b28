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
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xclip_fast.autochoice import Call
from xclip_fast.fused import FusedLayer, NormLinear, OutMLP
from xclip_fast.mlp import MLP, FusedMLP, mlp_width, run_mlp
from xclip_fast.ops import autocast_dtype, packed_attention, packed_kernel, resolve_backend
from xclip_fast.recompute import checkpointed, selective, selective_reason
from xclip_fast.submodules import layer_norm_reason, linear_reason, param

__all__ = ["Parts", "FusedMLP", "Drop", "no_drop", "in_projection", "project_qkv", "project_kv", "run_mlp",
           "mlp_width", "fused_parts", "message_path", "message_inputs", "message_attention", "frame_path",
           "frame_branches", "fused_layer", "cross_frame_path", "residual_path"]


class Parts(NamedTuple):
    """The sub-modules one layer is made of, whatever the module that owns them.

    Official blocks name them ``message_fc, message_ln, message_attn, ln_1, attn, ln_2, mlp``; the
    Hugging Face layer ``message_fc, message_ln, message_attn, layer_norm1, self_attn, layer_norm2,
    mlp``. Attention modules either hold a packed ``in_proj_weight`` (``nn.MultiheadAttention``) or
    separate ``q_proj/k_proj/v_proj`` (Hugging Face); both have ``num_heads`` and ``out_proj``.
    ``mlp`` is a :class:`FusedMLP` when the module is CLIP's Linear -> QuickGELU -> Linear (the
    adapters decide), else any callable (run as it is). The MIT's block leaves the message parts None.

    ``official``: the official block's layout of the message path, whose forward calls
    ``message_fc`` on ``(b, T, d)`` and ``message_ln`` on ``(T, b, d)`` (Hugging Face's layer calls them
    on ``(b*T, d)`` and ``(b, T, d)``). A module that is not plain (hooked, wrapped, see
    :mod:`xclip_fast.submodules`) is called in the layout its original forward gives it, so that what
    it sees is what it sees there; a plain one is read or called in whichever layout is fastest.
    """

    message_fc: nn.Module | None
    message_ln: nn.Module | None
    message_attn: nn.Module | None
    ln_1: nn.Module
    attn: nn.Module
    ln_2: nn.Module
    mlp: MLP
    official: bool = False


class Drop:
    """How a layer drops its branches (drop path): this base class drops nothing (evaluation, or
    rate 0). ``drop(branch, y)`` applies it to a branch's output ``y``, ``branch`` one of
    ``"message"``, ``"attention"``, ``"mlp"``; ``mask(branch, shape, dtype, device)`` draws the mask
    the fused layer applies as ``y / keep * mask`` to the branch of a layer whose residual stream has
    ``shape`` (for ``"message"``: the message tokens', ``(b, T, d)``), None: no drop. ``masks`` is
    False when the drop path cannot be given as masks (the fused layer then leaves the message path
    to ``drop``)."""

    keep = 1.0
    masks = True

    def __call__(self, branch: str, y: torch.Tensor) -> torch.Tensor:
        return y

    def mask(self, branch: str, shape, dtype: torch.dtype, device) -> torch.Tensor | None:
        return None


no_drop = Drop()


def in_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The packed ``(3d, d)`` in-projection weight and ``(3d,)`` bias (or None) of an attention
    module, or None when its projections must be called as modules.

    ``nn.MultiheadAttention`` holds them packed (the modules check it is plain before the fast path
    runs). Separate Hugging Face ``q_proj/k_proj/v_proj`` are concatenated on the fly (autograd
    reaches the originals) when all three are plain ``nn.Linear`` with biases alike; a wrapped or
    hooked projection (PEFT LoRA, ``prune``, a forward hook, see :mod:`xclip_fast.submodules`)
    gives None: :func:`project_qkv` then calls each one."""
    weight = param(attn, "in_proj_weight")
    if weight is not None:
        return weight, param(attn, "in_proj_bias")
    if not _separate_projections_plain(attn):
        return None
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    w = torch.cat([p.weight for p in projections])
    b = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projections])
    return w, b


def _separate_projections_plain(attn: nn.Module) -> bool:
    """Whether Hugging Face's ``q_proj/k_proj/v_proj`` are plain ``nn.Linear`` with biases alike."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    return not any(linear_reason(p) for p in projections) and len({p.bias is None for p in projections}) == 1


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


def _heads(attn: nn.Module, d: int) -> tuple[int, int]:
    H = attn.num_heads
    return H, d // H


def _dropout(attn: nn.Module) -> float:
    """The attention dropout of ``attn`` in training (``nn.MultiheadAttention`` and Hugging Face's
    attention both keep it as a float ``dropout``), 0 in evaluation."""
    p = getattr(attn, "dropout", 0.0)
    return float(p) if attn.training and isinstance(p, (int, float)) else 0.0


def _drops_attention(parts: Parts) -> bool:
    """Whether an attention of the layer applies dropout in this call."""
    return any(a is not None and _dropout(a) > 0.0 for a in (parts.attn, parts.message_attn))


def message_path(cls: torch.Tensor, T: int, parts: Parts, backend: str, drop=no_drop, frame_parallel=None, *,
                 recomputed: bool = False, module: nn.Module | None = None) -> torch.Tensor:
    """Cross-frame fusion attention: ``cls: (b*T, d)`` class tokens -> ``(b*T, d)`` message tokens.

    Runs batch-first over videos ``(b, T, d)``; ``drop("message", y)`` applies the drop path of the
    message branch. This is the only part of a layer that needs every frame of a video at once:
    with ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`), ``cls`` holds this
    process's T frames of each video, the message-token inputs of the whole clip are gathered, the
    message attention runs over all of them and a copy of this process's rows is returned (so the
    whole clip's are freed). ``recomputed`` (frame parallel): the message attention, which every
    process runs for the whole clip, is checkpointed whole and keeps its gathered input only (one
    row per frame of the clip instead of five; recomputing it costs about 1/l of a layer's FLOPs);
    ``module``, the layer, is what the recomputation checks (see :class:`xclip_fast.recompute.Replay`).
    """
    N, d = cls.shape
    msg = message_inputs(cls, T, parts)
    if frame_parallel is None:
        return message_attention(msg, parts, backend, drop).view(N, d)
    attend = functools.partial(message_attention, parts=parts, backend=backend, drop=drop)
    full = frame_parallel.gather(msg, 1)
    full = checkpointed("block" if recomputed else None, module, attend, full)
    return frame_parallel.own(full, 1).clone(memory_format=torch.contiguous_format).view(N, d)


def message_inputs(cls: torch.Tensor, T: int, parts: Parts) -> torch.Tensor:
    """``message_fc`` of the class tokens ``cls: (b*T, d)`` as ``(b, T, d)`` (frame-local)."""
    N, d = cls.shape
    fc = parts.message_fc
    if parts.official and linear_reason(fc):  # called on (b, T, d), as the official forward calls it
        return fc(cls.view(N // T, T, d))
    return fc(cls).view(N // T, T, d)


def message_attention(msg: torch.Tensor, parts: Parts, backend: str, drop=no_drop) -> torch.Tensor:
    """The message tokens ``(b, T, d)`` after attention among the T message tokens of each video
    (pre-LN, residual, drop path of the message branch)."""
    b, T, d = msg.shape
    attn = parts.message_attn
    H, Dh = _heads(attn, d)
    ln = parts.message_ln
    if parts.official and layer_norm_reason(ln):  # called on (T, b, d), as the official forward calls it
        h = ln(msg.transpose(0, 1)).transpose(0, 1)
    else:
        h = ln(msg)
    qkv = project_qkv(attn, in_projection(attn), h)
    a = packed_attention(qkv.view(b, T, 3, H, Dh), backend=backend, dropout_p=_dropout(attn))
    a = attn.out_proj(a.reshape(b, T, d))
    return msg + drop("message", a)


def _self_attention(x: torch.Tensor, parts: Parts, backend: str, batch_first: bool, attn_mask, msg=None):
    """``out_proj(attention(ln_1(x)))`` over each sequence of ``x`` (seq-first ``(S, B, d)`` or
    batch-first), with ``msg: (B, d)`` as one extra key/value per sequence when given. q, k, v stay
    in the in-projection GEMM's layout; the output comes back in the layout ``out_proj`` reads.

    With the message token, an ``ln_1``, projection or out-projection that is called as a module
    that is not plain (hooked, wrapped) gets the calls the original makes: ``ln_1`` and each
    projection once on the concatenation ``[x; msg]`` (``(S+1, B, d)``, or ``(B, S+1, d)``
    batch-first), a non-plain out-projection on all S+1 rows (the message token's query included,
    its row dropped after), so that a hook sees the shapes and token order it sees there; only the
    attention is this library's. Plain modules are read or called on the frame tokens only."""
    S, B, d = (x.shape[1], x.shape[0], x.shape[2]) if batch_first else x.shape
    attn = parts.attn
    H, Dh = _heads(attn, d)
    packed = in_projection(attn)
    out_plain = linear_reason(attn._modules["out_proj"]) is None

    def heads(qkv, rows):  # (B, rows, 3, H, Dh) of the GEMM output
        return qkv.view(B, rows, 3, H, Dh) if batch_first else qkv.view(rows, B, 3, H, Dh).transpose(0, 1)

    def tokens(o, rows):  # the attention output in the layout out_proj reads
        return o.reshape(B, rows, d) if batch_first else o.transpose(0, 1).reshape(rows, B, d)

    extra, p = None, _dropout(attn)
    if msg is not None and (packed is None or not out_plain or layer_norm_reason(parts.ln_1)):
        dim = 1 if batch_first else 0  # (msg promoted to x's dtype, as the original's cat does under autocast)
        qkv = heads(project_qkv(attn, packed, parts.ln_1(torch.cat([x, msg.to(x.dtype).unsqueeze(dim)], dim))), S + 1)
        if not out_plain:
            if attn_mask is not None:  # (an official block with such an out_proj runs its original computation)
                raise ValueError("an attention mask with a wrapped or hooked out_proj is not supported here")
            y = attn.out_proj(tokens(packed_attention(qkv, backend=backend, dropout_p=p), S + 1))
            return y[:, :S] if batch_first else y[:S]
        qkv, extra = qkv[:, :S], qkv[:, S, 1:]  # the message token's key/value only
    else:
        qkv = heads(project_qkv(attn, packed, parts.ln_1(x)), S)
        if msg is not None:
            # the original concatenates msg to x (promoting it to x's dtype under autocast) before ln_1
            extra = project_kv(attn, packed, parts.ln_1(msg.to(x.dtype))).view(B, 2, H, Dh)  # its k, v only
    o = packed_attention(qkv, extra, backend=backend, attn_mask=attn_mask, dropout_p=p)
    return attn.out_proj(tokens(o, S))


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


def fused_parts(parts: Parts) -> bool:
    """Whether a layer's frame path may run as :func:`fused_layer`: stock LayerNorms without hooks,
    an in-projection that can be read packed, a plain out-projection and CLIP's QuickGELU MLP (see
    :mod:`xclip_fast.submodules`). Every part is then read, not called."""
    return (isinstance(parts.mlp, FusedMLP) and layer_norm_reason(parts.ln_1) is None
            and layer_norm_reason(parts.ln_2) is None and _projections_read(parts.attn))


def _projections_read(attn: nn.Module) -> bool:
    """Whether an attention module's projections can be read instead of called: an in-projection
    that can be read packed and a plain out-projection."""
    return (linear_reason(attn._modules["out_proj"]) is None
            and (param(attn, "in_proj_weight") is not None or _separate_projections_plain(attn)))


def fused_message(parts: Parts, drop: Drop) -> bool:
    """Whether :class:`~xclip_fast.fused.FusedLayer` may run the message path too: ``message_fc`` and
    ``message_ln`` plain, an in-projection of the message attention that can be read packed and a
    plain out-projection, no attention dropout, a drop path given as masks."""
    return (drop.masks and linear_reason(parts.message_fc) is None and layer_norm_reason(parts.message_ln) is None
            and _dropout(parts.message_attn) == 0.0 and _projections_read(parts.message_attn))


def fused_layer(x: torch.Tensor, parts: Parts, backend: str, level: str, msg: torch.Tensor | None = None, *,
                T: int | None = None, batch_first: bool = False, attn_mask: torch.Tensor | None = None,
                drop: Drop = no_drop) -> torch.Tensor | None:
    """The frame path of a layer whose parts are :func:`fused_parts`, at ``level``, as the
    Functions of :mod:`xclip_fast.fused`: one :class:`~xclip_fast.fused.FusedLayer` where the
    attention has an explicit forward and backward (:func:`xclip_fast.ops.packed_kernel`), else
    :class:`~xclip_fast.fused.NormLinear`, the attention operator and
    :class:`~xclip_fast.fused.OutMLP` (``"none"``, ``"lean"``, ``"min"``; None for ``"block"``, which
    then needs whole-layer checkpointing). ``msg``: the message tokens, the attention's extra
    key/value; ``T`` instead (frames per video, :func:`fused_message` parts): the message path runs
    inside the Function too, from the class tokens of ``x`` (None when the attention has no explicit
    pair: the caller then runs it)."""
    S, B, d = (x.shape[1], x.shape[0], x.shape[2]) if batch_first else x.shape
    attn, ln_1, ln_2 = parts.attn, parts.ln_1, parts.ln_2
    H, Dh = _heads(attn, d)
    device = x.device
    cast = autocast_dtype(device)
    dtype = cast if cast is not None and x.dtype != torch.float64 else x.dtype  # the GEMMs' and the attention's
    p = _dropout(attn)
    call = Call(B, S, S, H, msg is not None or T is not None, True)  # (a FusedLayer runs while autograd records)
    kernel = packed_kernel(resolve_backend(backend, device, dtype=dtype, head_dim=Dh, attn_mask=attn_mask is not None,
                                           dropout=p > 0.0, call=call, like=x), device, dtype, p)
    if kernel is None and (level == "block" or T is not None):
        return None
    message, message_cfg = (None,) * 9, None
    if T is not None:  # the message path's parameters, its attention's kernel and its drop-path mask
        m_attn = parts.message_attn
        Hm, Dm = _heads(m_attn, d)
        m_call = Call(B // T, T, T, Hm, False, True)
        m_backend = resolve_backend(backend, device, dtype=dtype, head_dim=Dm, call=m_call, like=x)
        m_kernel = packed_kernel(m_backend, device, dtype, 0.0)
        if m_kernel is None:
            return None
        message = (*_weight_bias(parts.message_fc), *_weight_bias(parts.message_ln), *in_projection(m_attn),
                   *_weight_bias(m_attn._modules["out_proj"]),
                   drop.mask("message", (B // T, T, d), dtype, device))
        message_cfg = (T, parts.message_ln.eps, Hm, Dm**-0.5, m_kernel)
    packed = in_projection(attn)
    if msg is not None:  # (the original concatenates msg to x, promoting it to x's dtype, before ln_1)
        msg = msg.to(x.dtype)
    mlp_backend = "torch" if backend == "torch" else resolve_backend(backend, device, dtype=cast or x.dtype)
    # the parameters, read from the modules' dicts (this runs on every forward)
    params = (*_weight_bias(ln_1), *packed, *_weight_bias(attn._modules["out_proj"]), *_weight_bias(ln_2),
              *_weight_bias(parts.mlp.fc1), *_weight_bias(parts.mlp.fc2))
    low_rank, scales = parts.mlp.low_rank
    if kernel is not None:
        cfg = (H, batch_first, ln_1.eps, ln_2.eps, drop.keep, cast, kernel, Dh**-0.5, mlp_backend, level, message_cfg,
               scales)
        return FusedLayer.apply(x, msg, *params, drop.mask("attention", x.shape, dtype, device),
                                drop.mask("mlp", x.shape, dtype, device),
                                None if attn_mask is None else attn_mask.to(dtype), *message, *low_rank, cfg)
    extra = None if msg is None else project_kv(attn, packed, ln_1(msg)).view(B, 2, H, Dh)
    qkv = NormLinear.apply(x, *params[:4], ln_1.eps, cast, level == "none")
    qkv = qkv.view(B, S, 3, H, Dh) if batch_first else qkv.view(S, B, 3, H, Dh).transpose(0, 1)
    o = packed_attention(qkv, extra, backend=backend, attn_mask=attn_mask, dropout_p=p)
    o = (o if batch_first else o.transpose(0, 1)).flatten(2)  # x's order; memory as the attention left it
    # (after the attention's dropout)
    masks = drop.mask("attention", x.shape, o.dtype, device), drop.mask("mlp", x.shape, o.dtype, device)
    return OutMLP.apply(x, o, *params[4:], *masks, drop.keep, ln_2.eps, cast, mlp_backend, level, *low_rank, scales)


def _weight_bias(m: nn.Module) -> tuple:
    """``(weight, bias)`` of a plain Linear or LayerNorm (either may be None; a parametrized one's
    computed through its parametrization)."""
    return param(m, "weight"), param(m, "bias")


def cross_frame_path(x: torch.Tensor, T: int, parts: Parts, backend: str, *, batch_first: bool = False,
                     attn_mask: torch.Tensor | None = None, drop: Drop = no_drop, recompute: str | None = None,
                     frame_parallel=None, module: nn.Module | None = None) -> torch.Tensor:
    """A whole CCT layer on ``x: (l, b*T, d)`` (or ``(b*T, l, d)`` with ``batch_first``): the message
    path on the class tokens, then :func:`frame_path`. ``recompute``: the level that applies to this
    call (None: autograd does not record it), see :mod:`xclip_fast.recompute`; ``module``: the
    layer (whole-layer checkpointing and the selective fallback rerun it and check its state).

    ``frame_parallel`` (a :class:`xclip_fast.parallel.FrameParallel`): ``x`` holds this process's T
    frames of each video. The message path (with its exchange) runs before any recomputed region,
    which gets this process's message tokens as an input, so a recomputation never repeats a
    collective; at every level but ``"none"`` it keeps only its gathered input (see
    :func:`message_path`)."""
    fused = recompute is not None and fused_parts(parts)
    if frame_parallel is None and not fused:
        body = functools.partial(_cross_frame_branches, T=T, parts=parts, backend=backend, batch_first=batch_first,
                                 attn_mask=attn_mask, drop=drop)
        return _layer(body, x, parts, recompute, drop, module)
    if frame_parallel is None and fused_message(parts, drop):  # the whole layer in one Function
        out = fused_layer(x, parts, backend, recompute, T=T, batch_first=batch_first, attn_mask=attn_mask, drop=drop)
        if out is not None:
            return out
    msg = message_path(x[:, 0] if batch_first else x[0], T, parts, backend, drop, frame_parallel,
                       recomputed=recompute not in (None, "none"), module=module)
    if fused:
        out = fused_layer(x, parts, backend, recompute, msg, batch_first=batch_first, attn_mask=attn_mask, drop=drop)
        if out is not None:
            return out
    body = functools.partial(frame_branches, parts=parts, backend=backend, batch_first=batch_first,
                             attn_mask=attn_mask, drop=drop)
    return _layer(body, x, parts, recompute, drop, module, msg)


def _cross_frame_branches(x: torch.Tensor, T: int, parts: Parts, backend: str, batch_first: bool, attn_mask,
                          drop, recomputed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    msg = message_path(x[:, 0] if batch_first else x[0], T, parts, backend, drop)
    return frame_branches(x, msg, parts, backend, batch_first=batch_first, attn_mask=attn_mask, drop=drop,
                          recomputed=recomputed)


def residual_path(x: torch.Tensor, parts: Parts, backend: str, *, batch_first: bool = False,
                  attn_mask: torch.Tensor | None = None, recompute: str | None = None,
                  module: nn.Module | None = None) -> torch.Tensor:
    """Pre-LN self-attention + MLP (the MIT's block) on ``(S, B, d)`` or batch-first ``(B, S, d)``;
    ``recompute`` and ``module`` as for :func:`cross_frame_path`."""
    if recompute is not None and fused_parts(parts):
        out = fused_layer(x, parts, backend, recompute, batch_first=batch_first, attn_mask=attn_mask)
        if out is not None:
            return out
    body = functools.partial(frame_branches, msg=None, parts=parts, backend=backend, batch_first=batch_first,
                             attn_mask=attn_mask)
    return _layer(body, x, parts, recompute, no_drop, module)


def _layer(branches: Callable, x: torch.Tensor, parts: Parts, recompute: str | None, drop, module: nn.Module,
           *inputs) -> torch.Tensor:
    """``x1 + drop("mlp", y)`` of ``(x1, y) = branches(x, *inputs, recomputed=...)`` for a layer that is
    not fused at ``recompute``: checkpointed whole at ``"block"``; at ``"lean"``/``"min"`` through the
    selective fallback, unless a recomputation would call a hook again or the attention drops out
    (the fallback keeps the attention's output and recomputes the other random numbers from the
    restored generator state: an attention that draws would shift them): then as at ``"none"``."""
    if recompute == "block":
        x1, y = checkpointed("block", module, functools.partial(branches, recomputed=True), x, *inputs)
    elif recompute in ("lean", "min") and selective_reason(module) is None and not _drops_attention(parts):
        x1, y = selective(recompute, module, functools.partial(branches, recomputed=True), x, *inputs,
                          d=x.shape[-1], hidden=mlp_width(parts.mlp))
    else:
        x1, y = branches(x, *inputs, recomputed=False)
    return x1 + drop("mlp", y)
