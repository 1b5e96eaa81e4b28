"""The hand-written autograd Functions of a plain layer's frame path: each forward saves what its
recompute level keeps, each backward recomputes the rest and computes every gradient in one
Python call (no dispatch mode, no second Python forward).

- :class:`FusedLayer`: the whole frame path, ``x -> x1 + drop(mlp(ln_2(x1)))`` with
  ``x1 = x + drop(out_proj(attention(ln_1(x))))``, the attention run by its explicit forward and
  backward (:func:`xclip_fast.ops.packed_forward`: the triton operators, or PyTorch's CPU flash
  attention), and the message path before it (from the class tokens of ``x``; or the message
  tokens given). Every level: ``"none"``, ``"lean"``, ``"min"`` and ``"block"``; the message path
  (a few rows per frame) keeps everything at every level.
- :class:`NormLinear` and :class:`OutMLP`: the same layer in two pieces around an attention that
  has no explicit forward/backward (the torch backend on CUDA, attention dropout), which autograd
  then records between them; levels ``"none"``, ``"lean"`` and ``"min"`` (which keeps the attention
  output instead of recomputing the attention).

What each level keeps, in d-wide rows per frame token at the released MLP width (4d), the layer's
input (kept by every level) aside:

========  ===========================================================  ==============================
level     keeps                                                        recomputes in backward
========  ===========================================================  ==============================
none      ln_1(x), q/k/v, attention output, x1, ln_2(x1), pre-act.: 11  nothing
lean      q/k/v, attention output, MLP pre-activation: 8                 LayerNorms, out-projection
min       MLP pre-activation: 4                                          also in-projection, attention
block     nothing                                                        also the MLP's first GEMM
========  ===========================================================  ==============================

Two-piece ``"min"`` keeps q/k/v and the attention output (also 4 rows) and recomputes the MLP's
first GEMM instead. LayerNorm statistics (two numbers per token) are always kept. Under autocast
the LayerNorms run in their autocast dtype and the GEMMs in the autocast dtype, as the modules
would; the weights' autocast copies are kept for the backward, as autocast keeps them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from xclip_fast.lowrank import add_low_rank_, from_inputs, low_rank_grads, low_rank_input_grad_
from xclip_fast.mlp import quick_gelu_and_grad, quick_gelu_resolved
from xclip_fast.ops import autocast_cast, packed_backward, packed_forward, packed_inputs

__all__ = ["FusedLayer", "NormLinear", "OutMLP"]

_LN_BWD = torch.ops.aten.native_layer_norm_backward.default


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``layer_norm`` computes in for ``x``: float32 for half inputs under CUDA autocast
    (its float32 list), else ``x``'s (CPU autocast leaves ``layer_norm`` alone)."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype


def _layer_norm(x: torch.Tensor, w, b, eps: float):
    """``(input, out, mean, rstd)`` of ``layer_norm`` over the last dim, in autocast's dtype."""
    dtype = _norm_dtype(x)
    if dtype != x.dtype:
        x, w, b = (None if t is None else t.to(dtype) for t in (x, w, b))
    return (x, *torch.native_layer_norm(x, (x.shape[-1],), w, b, eps))


def _normed(xn: torch.Tensor, w, b, eps: float, cast) -> torch.Tensor:
    """The LayerNorm's output recomputed from its input, as the GEMM after it reads it (2-D rows)."""
    h = torch.native_layer_norm(xn, (xn.shape[-1],), w, b, eps)[0]
    return autocast_cast(cast, h)[0].reshape(-1, xn.shape[-1])


def _linear2d(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(b, x2, w.t()) if b is not None else torch.mm(x2, w.t())


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t: (A, B, k)`` as 2-D rows in memory order, and whether that order is ``(B, A)``: the
    attention output is seq-first or batch-first whatever the residual stream is (copied only when
    it is neither)."""
    if t.is_contiguous():
        return t.view(-1, t.shape[-1]), False
    if t.transpose(0, 1).is_contiguous():
        return t.transpose(0, 1).view(-1, t.shape[-1]), True
    return t.reshape(-1, t.shape[-1]), False


def _from_rows(r: torch.Tensor, shape, transposed: bool) -> torch.Tensor:
    """Rows back to ``shape (A, B, n)`` (a view; see :func:`_rows`)."""
    return r.view(shape[1], shape[0], -1).transpose(0, 1) if transposed else r.view(shape[0], shape[1], -1)


def _dropped(y: torch.Tensor, mask, keep: float) -> torch.Tensor:
    """Drop path as the official code writes it: ``y / keep * mask`` (mask None: no drop)."""
    return y if mask is None else y.div(keep) * mask


def _dropped_grad(g: torch.Tensor, mask, keep: float) -> torch.Tensor:
    return g if mask is None else g.mul(mask).div_(keep)


def _norm_linear_backward(dy2, xn, mean, rstd, ln_w, ln_b, wc, hc, eps: float, cast, need):
    """Gradients of ``linear(layer_norm(x))`` from the output's rows ``dy2``: ``(dx, dln_w, dln_b,
    dw, db)`` for ``need`` = which of them are wanted; ``hc`` (the normalised input as the GEMM read
    it) is recomputed when None."""
    need_x, need_lw, need_lb, need_w, need_b = need
    d = xn.shape[-1]
    dx = dlw = dlb = dw = db = None
    if need_w:
        dw = dy2.t().mm(_normed(xn, ln_w, ln_b, eps, cast) if hc is None else hc.reshape(-1, d))
    if need_b:
        db = dy2.sum(0)
    if need_x or need_lw or need_lb:
        dh = dy2.mm(wc).view(xn.shape)
        dx, dlw, dlb = _LN_BWD(dh.to(xn.dtype), xn, (d,), mean, rstd, ln_w, ln_b, [need_x, need_lw, need_lb])
    return dx, dlw, dlb, dw, db


def _residual_after_attention(x, o, wo, bo, mask_a, keep: float) -> torch.Tensor:
    """``x1 = x + drop(out_proj(o))``, the out-projection run in ``o``'s memory order."""
    o2, transposed = _rows(o)
    return x + _dropped(_from_rows(_linear2d(o2, wo, bo), x.shape, transposed), mask_a, keep)


def _post_forward(x, o, wo, bo, ln_w, ln_b, w1, b1, w2, b2, mask_a, mask_m, keep, eps, cast, backend, lora=(None,) * 2):
    """The layer after its attention: ``(result, ln_2's input, its output as rows, mean, rstd, pre)``;
    ``lora``: the MLP's low-rank updates (see :func:`xclip_fast.lowrank.from_inputs`)."""
    x1 = _residual_after_attention(x, o, wo, bo, mask_a, keep)
    xn, h, mean, rstd = _layer_norm(x1, ln_w, ln_b, eps)
    h2 = autocast_cast(cast, h)[0].reshape(-1, x.shape[-1])
    pre = add_low_rank_(_linear2d(h2, w1, b1), h2, lora[0])
    g = quick_gelu_resolved(pre, backend)
    y = add_low_rank_(_linear2d(g, w2, b2), g, lora[1]).view(x1.shape)
    return x1 + _dropped(y, mask_m, keep), xn, h2, mean, rstd, pre


def _post_backward(dout, o, xn, h2, mean, rstd, pre, wo, ln_w, ln_b, w1, w2, mask_a, mask_m, keep, backend, need,
                   lora=(None,) * 2):
    """Gradients of :func:`_post_forward` for ``need`` = which of ``(x, o, wo, bo, ln_w, ln_b, w1, b1,
    w2, b2, A1, B1, A2, B2)`` are wanted: ``(dx, do, dwo, dbo, dln_w, dln_b, dw1, db1, dw2, db2, dA1, dB1,
    dA2, dB2)`` (``dx`` always)."""
    d = xn.shape[-1]
    dy = _dropped_grad(dout, mask_m, keep).reshape(-1, d).to(pre.dtype)
    dg = dy.mm(w2)
    dyb2 = low_rank_input_grad_(dy, dg, lora[1])
    g, dpre = quick_gelu_and_grad(pre, dg, backend)
    dla2, dlb2 = low_rank_grads(g, dyb2, lora[1], *need[12:14])
    dw2 = dy.t().mm(g) if need[8] else None
    db2 = dy.sum(0) if need[9] else None
    dw1 = dpre.t().mm(h2) if need[6] else None
    db1 = dpre.sum(0) if need[7] else None
    dh = dpre.mm(w1)
    dla1, dlb1 = low_rank_grads(h2, low_rank_input_grad_(dpre, dh, lora[0]), lora[0], *need[10:12])
    dh = dh.view(xn.shape).to(xn.dtype)
    dx, dlw, dlb = _LN_BWD(dh, xn, (d,), mean, rstd, ln_w, ln_b, [True, need[4], need[5]])
    dx = dx.add_(dout) if dx.dtype == dout.dtype else dout + dx
    o2, transposed = _rows(o)
    da = _dropped_grad(dx, mask_a, keep).to(o.dtype)
    da2 = (da.transpose(0, 1) if transposed else da).reshape(-1, d)
    dwo = da2.t().mm(o2) if need[2] else None
    dbo = da2.sum(0) if need[3] else None
    do = _from_rows(da2.mm(wo), o.shape, transposed) if need[1] else None
    return dx, do, dwo, dbo, dlw, dlb, dw1, db1, dw2, db2, dla1, dlb1, dla2, dlb2


# ------------------------------------------------------------------------------------------------
# the whole frame path
# ------------------------------------------------------------------------------------------------
def _qkv5(qkv: torch.Tensor, x: torch.Tensor, heads: int, batch_first: bool) -> torch.Tensor:
    """The in-projection's rows as ``(B, S, 3, H, D)``, in the GEMM's layout (seq-first for a
    seq-first ``x``)."""
    A, Bx, d = x.shape
    if batch_first:
        return qkv.view(A, Bx, 3, heads, d // heads)
    return qkv.view(A, Bx, 3, heads, d // heads).transpose(0, 1)


def _message_forward(cls, fc_w, fc_b, ln_w, ln_b, in_w, in_b, out_w, out_b, mask, keep, cast, cfg):
    """The message path of a layer on its class tokens ``cls (N, d)``: ``message_fc``, then per
    video of T frames ``msg_in + drop(out_proj(attention(message_ln(msg_in))))``. Returns what its
    backward reads (the weights as the GEMMs read them, ``message_ln``'s parameters, input, output
    and statistics, q/k/v, the attention's output and log-sum-exp) and, last, the message tokens."""
    T, eps, heads, scale, kernel = cfg
    N, d = cls.shape
    cls, fc_w, fc_b, in_w, in_b, out_w, out_b = autocast_cast(cast, cls, fc_w, fc_b, in_w, in_b, out_w, out_b)
    msg_in = _linear2d(cls, fc_w, fc_b)
    xn, h, mean, rstd = _layer_norm(msg_in, ln_w, ln_b, eps)
    h = autocast_cast(cast, h)[0]
    qkv = _linear2d(h, in_w, in_b)
    out, lse = packed_forward(kernel, qkv.view(N // T, T, 3, heads, d // heads), None, scale)
    a = _linear2d(out.reshape(N, d), out_w, out_b)
    msg = msg_in + (a if mask is None else (a.view(N // T, T, d).div(keep) * mask).view(N, d))
    return fc_w, ln_w, ln_b, in_w, out_w, xn, h, mean, rstd, qkv, out, lse, msg


def _message_backward(dmsg, cls, fc_w, ln_w, ln_b, in_w, out_w, xn, h, mean, rstd, qkv, out, lse, mask, keep, cast,
                      cfg, need):
    """Gradients of :func:`_message_forward` from the message tokens' ``dmsg``: those of
    ``message_fc``, ``message_ln``, the in- and out-projection (``need``: which are wanted), then of
    the class tokens."""
    T, eps, heads, scale, kernel = cfg
    N, d = cls.shape
    dmsg = dmsg.to(out.dtype)
    da = dmsg if mask is None else (dmsg.view(N // T, T, d) * mask).div_(keep).view(N, d)
    dout_w = da.t().mm(out.reshape(N, d)) if need[6] else None
    dout_b = da.sum(0) if need[7] else None
    dqkv, _ = packed_backward(kernel, qkv.view(N // T, T, 3, heads, d // heads), None, out, lse,
                              da.mm(out_w).view(N // T, T, heads, d // heads), scale)
    dqkv = dqkv.reshape(N, 3 * d)
    din_w = dqkv.t().mm(h) if need[4] else None
    din_b = dqkv.sum(0) if need[5] else None
    dxn, dln_w, dln_b = _LN_BWD(dqkv.mm(in_w).to(xn.dtype), xn, (d,), mean, rstd, ln_w, ln_b, [True, need[2], need[3]])
    dmsg_in = (dxn + dmsg).to(fc_w.dtype)  # (the residual around the message attention)
    dfc_w = dmsg_in.t().mm(autocast_cast(cast, cls)[0]) if need[0] else None
    dfc_b = dmsg_in.sum(0) if need[1] else None
    return dfc_w, dfc_b, dln_w, dln_b, din_w, din_b, dout_w, dout_b, dmsg_in.mm(fc_w)


class FusedLayer(torch.autograd.Function):
    """A whole layer's frame path (see the module doc) at ``cfg``'s level, with its message path.

    Inputs: the residual stream ``x`` (``(l, N, d)``, batch-first ``(N, l, d)``), the message
    tokens ``msg (N, d)`` (or None), layer-normed by ``ln_1`` and projected to their key and value
    only, one extra key/value per frame; the parameters of ``ln_1``, the in-projection, the
    out-projection, ``ln_2`` and the MLP, the drop-path masks of the two branches (None: no drop),
    an additive attention mask (or None); the parameters of ``message_fc``, ``message_ln``, the
    message attention's in- and out-projection and the message branch's drop-path mask, when the
    message path runs here (``msg`` None; all None otherwise); the low-rank updates of the MLP's
    Linears ``A1, B1, A2, B2`` (None without; see :mod:`xclip_fast.lowrank`); and the constants ``cfg = (heads,
    batch_first, ln_1 eps, ln_2 eps, the drop path's keep probability, the autocast dtype or None,
    the attention kernel (see :func:`xclip_fast.ops.packed_kernel`), the softmax scale, QuickGELU's
    resolved backend, the level, the message path's (T, message_ln eps, heads, scale, kernel) or
    None, the low-rank updates' scales)``. Without message tokens either way it is plain
    self-attention (the MIT). Gradients flow to every tensor input but the masks."""

    @staticmethod
    def forward(ctx, x, msg, ln1_w, ln1_b, w_in, b_in, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, mask_a, mask_m,
                attn_mask, mfc_w, mfc_b, mln_w, mln_b, min_w, min_b, mout_w, mout_b, mask_msg, a1, bl1, a2, bl2,
                cfg):
        heads, batch_first, eps1, eps2, keep, cast, kernel, scale, mlp_backend, level, message, scales = cfg
        d = x.shape[-1]
        saved_message = (None,) * 13
        if message is not None:  # the message path, from the class tokens
            saved_message = _message_forward(x[:, 0] if batch_first else x[0], mfc_w, mfc_b, mln_w, mln_b, min_w,
                                             min_b, mout_w, mout_b, mask_msg, keep, cast, message)
            msg = saved_message[-1].to(x.dtype)  # (the original concatenates it to x, promoting it to x's dtype)
        xn1, h, mean1, rstd1 = _layer_norm(x, ln1_w, ln1_b, eps1)
        weights = (w_in, b_in, wo, bo, w1, b1, w2)  # "block" keeps these, not their autocast copies
        hc, w_in, b_in, wo, bo, w1, b1, w2, b2, a1, bl1, a2, bl2 = autocast_cast(
            cast, h, w_in, b_in, wo, bo, w1, b1, w2, b2, a1, bl1, a2, bl2)
        qkv = _linear2d(hc.reshape(-1, d), w_in, b_in)
        extra = xm = hm = mean_m = rstd_m = None
        if msg is not None:  # its key and value: the in-projection's last 2d rows
            xm, hm, mean_m, rstd_m = _layer_norm(msg, ln1_w, ln1_b, eps1)
            hm = autocast_cast(cast, hm)[0]
            extra = _linear2d(hm, w_in[d:], None if b_in is None else b_in[d:]).view(-1, 2, heads, d // heads)
        out, lse = packed_forward(kernel, _qkv5(qkv, x, heads, batch_first), extra, scale, attn_mask)
        o = (out if batch_first else out.transpose(0, 1)).flatten(2)
        res, xn2, h2, mean2, rstd2, pre = _post_forward(x, o, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, mask_a, mask_m,
                                                        keep, eps2, cast, mlp_backend,
                                                        from_inputs(a1, bl1, a2, bl2, scales))
        if level == "none":
            kept = (hc, qkv, out, lse, xn2, h2, pre)
        elif level == "lean":
            kept = (None, qkv, out, lse, None, None, pre)
        else:
            kept = (None, None, None, None, None, None, pre if level == "min" else None)
        if level != "block":
            weights = (w_in, b_in, wo, bo, w1, b1, w2)
        # (ln_1's input is x itself unless autocast casts it: saved once, so that offloading moves it once)
        ctx.save_for_backward(x, None if xn1 is x else xn1, mean1, rstd1, mean2, rstd2, xm, hm, mean_m, rstd_m, extra,
                              ln1_w, ln1_b, ln2_w, ln2_b, mask_a, mask_m, attn_mask, *weights, *kept, a1, bl1, a2, bl2,
                              *saved_message[:-1], mask_msg)
        ctx.cfg = cfg
        return res

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x, xn1, mean1, rstd1, mean2, rstd2, xm, hm, mean_m, rstd_m, extra, ln1_w, ln1_b, ln2_w, ln2_b, mask_a, mask_m,
         attn_mask, w_in, b_in, wo, bo, w1, b1, w2, hc, qkv, out, lse, xn2, h2, pre, a1, bl1, a2, bl2,
         *saved_message) = ctx.saved_tensors
        heads, batch_first, eps1, eps2, keep, cast, kernel, scale, mlp_backend, level, message, scales = ctx.cfg
        xn1 = x if xn1 is None else xn1
        need = ctx.needs_input_grad
        if level == "block":
            w_in, b_in, wo, bo, w1, b1, w2 = autocast_cast(cast, w_in, b_in, wo, bo, w1, b1, w2)
        heads_first = None
        if qkv is None:  # min, block: the in-projection and the attention again
            hc = _normed(xn1, ln1_w, ln1_b, eps1, cast)
            qkv = _linear2d(hc, w_in, b_in)
            qkv5 = _qkv5(qkv, x, heads, batch_first)
            heads_first = packed_inputs(kernel, qkv5, extra)
            out, lse = packed_forward(kernel, qkv5, extra, scale, attn_mask, heads_first)
        else:
            qkv5 = _qkv5(qkv, x, heads, batch_first)
        o = (out if batch_first else out.transpose(0, 1)).flatten(2)
        if xn2 is None:  # lean, min, block: the out-projection, the residual and ln_2 again
            xn2, h2 = _layer_norm(_residual_after_attention(x, o, wo, bo, mask_a, keep), ln2_w, ln2_b, eps2)[:2]
            h2 = autocast_cast(cast, h2)[0].reshape(-1, h2.shape[-1])
        lora = from_inputs(a1, bl1, a2, bl2, scales)
        if pre is None:  # block: the MLP's first GEMM again
            pre = add_low_rank_(_linear2d(h2, w1, b1), h2, lora[0])
        post_need = (True, True, *need[6:14], *need[26:30])
        dx, do, dwo, dbo, dlw2, dlb2, dw1, db1, dw2, db2, *low_rank_grads_ = _post_backward(
            dout, o, xn2, h2, mean2, rstd2, pre, wo, ln2_w, ln2_b, w1, w2, mask_a, mask_m, keep, mlp_backend, post_need,
            lora)
        do = do.unflatten(2, (heads, -1))
        dqkv, dextra = packed_backward(kernel, qkv5, extra, out, lse, do if batch_first else do.transpose(0, 1),
                                       scale, attn_mask, heads_first)
        dqkv = (dqkv if batch_first else dqkv.transpose(0, 1)).reshape(-1, qkv.shape[-1])
        dxl, dlw1, dlb1, dw_in, db_in = _norm_linear_backward(dqkv, xn1, mean1, rstd1, ln1_w, ln1_b, w_in, hc, eps1,
                                                              cast, (True, *need[2:6]))
        dx = dx.add_(dxl) if dx.dtype == dxl.dtype else dx + dxl
        dmsg = None
        if xm is not None:  # the message tokens' key/value projection and their ln_1
            d = x.shape[-1]
            dkv = dextra.reshape(-1, 2 * d)
            if dw_in is not None:
                dw_in[d:].addmm_(dkv.t(), hm)
            if db_in is not None:
                db_in[d:].add_(dkv.sum(0))
            need_msg = need[1] or message is not None
            if need_msg or need[2] or need[3]:
                dmsg, dlw, dlb = _LN_BWD(dkv.mm(w_in[d:]).to(xm.dtype), xm, (d,), mean_m, rstd_m, ln1_w, ln1_b,
                                         [need_msg, need[2], need[3]])
                dlw1 = dlw if dlw1 is None else dlw1.add_(dlw)
                dlb1 = dlb if dlb1 is None else dlb1.add_(dlb)
        message_grads = (None,) * 8
        if message is not None:  # back through the message path into the class tokens' rows of dx
            *message_grads, dcls = _message_backward(dmsg, x[:, 0] if batch_first else x[0], *saved_message, keep,
                                                     cast, message, need[17:25])
            (dx[:, 0] if batch_first else dx[0]).add_(dcls)
            dmsg = None
        return (dx, dmsg, dlw1, dlb1, dw_in, db_in, dwo, dbo, dlw2, dlb2, dw1, db1, dw2, db2, None, None, None,
                *message_grads, None, *low_rank_grads_, None)


# ------------------------------------------------------------------------------------------------
# two pieces around an attention recorded by autograd
# ------------------------------------------------------------------------------------------------
class NormLinear(torch.autograd.Function):
    """``linear(layer_norm(x, ln_w, ln_b, eps), w, b)`` keeping ``x`` and the LayerNorm statistics
    (and the normalised input when ``keep_normed``); without it the backward recomputes the
    LayerNorm (elementwise, no GEMM). ``cast``: the autocast dtype (or None)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w, b, eps: float, cast, keep_normed: bool):
        xn, h, mean, rstd = _layer_norm(x, ln_w, ln_b, eps)
        hc, wc, bc = autocast_cast(cast, h, w, b)
        y = _linear2d(hc.reshape(-1, x.shape[-1]), wc, bc)
        ctx.save_for_backward(xn, mean, rstd, ln_w, ln_b, wc, hc if keep_normed else None)
        ctx.eps, ctx.cast = eps, cast
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xn, mean, rstd, ln_w, ln_b, wc, hc = ctx.saved_tensors
        grads = _norm_linear_backward(dy.reshape(-1, dy.shape[-1]), xn, mean, rstd, ln_w, ln_b, wc, hc, ctx.eps,
                                      ctx.cast, ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


class OutMLP(torch.autograd.Function):
    """The layer after its attention, ``x1 + drop(fc2(QuickGELU(fc1(ln_2(x1)))))`` with
    ``x1 = x + drop(out_proj(o))``, keeping per ``level``: ``"none"``: ``o``, ``x1``, the
    normalised ``x1`` and the pre-activation; ``"lean"``: ``o`` and the pre-activation (``x`` is
    the layer's input, kept anyway; the out-projection, the residual and ``ln_2`` are recomputed);
    ``"min"``: ``o`` only (the MLP's first GEMM is recomputed too).

    ``x: (A, B, d)`` is the residual stream, ``o: (A, B, d)`` the attention output in the same
    logical order (any memory order: see :func:`_rows`); ``mask_a``/``mask_m``: the drop-path masks
    of the two branches (None: no drop), ``keep`` their keep probability; ``backend``: the resolved
    backend of QuickGELU."""

    @staticmethod
    def forward(ctx, x, o, wo, bo, ln_w, ln_b, w1, b1, w2, b2, mask_a, mask_m, keep: float, eps: float, cast,
                backend: str, level: str, a1=None, bl1=None, a2=None, bl2=None, scales=(0.0, 0.0)):
        oc, wo, bo, w1, b1, w2, b2, a1, bl1, a2, bl2 = autocast_cast(cast, o, wo, bo, w1, b1, w2, b2, a1, bl1, a2, bl2)
        lora = from_inputs(a1, bl1, a2, bl2, scales)
        res, xn, h2, mean, rstd, pre = _post_forward(x, oc, wo, bo, ln_w, ln_b, w1, b1, w2, b2, mask_a, mask_m, keep,
                                                     eps, cast, backend, lora)
        kept = (xn, h2, pre) if level == "none" else (None, None, pre if level == "lean" else None)
        ctx.save_for_backward(x, oc, mean, rstd, wo, bo, ln_w, ln_b, w1, b1, w2, mask_a, mask_m, *kept, a1, bl1, a2,
                              bl2)
        ctx.keep, ctx.eps, ctx.cast, ctx.backend, ctx.scales = keep, eps, cast, backend, scales
        return res

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, oc, mean, rstd, wo, bo, ln_w, ln_b, w1, b1, w2, mask_a, mask_m, xn, h2, pre, a1, bl1, a2, bl2 = \
            ctx.saved_tensors
        lora = from_inputs(a1, bl1, a2, bl2, ctx.scales)
        if xn is None:  # recompute the residual after attention and its LayerNorm (and, at min, the first GEMM)
            xn, h2 = _layer_norm(_residual_after_attention(x, oc, wo, bo, mask_a, ctx.keep), ln_w, ln_b, ctx.eps)[:2]
            h2 = autocast_cast(ctx.cast, h2)[0].reshape(-1, h2.shape[-1])
            if pre is None:
                pre = add_low_rank_(_linear2d(h2, w1, b1), h2, lora[0])
        need = (*ctx.needs_input_grad, *(False,) * (22 - len(ctx.needs_input_grad)))  # (updates are optional)
        grads = _post_backward(dout, oc, xn, h2, mean, rstd, pre, wo, ln_w, ln_b, w1, w2, mask_a, mask_m, ctx.keep,
                               ctx.backend, (*need[:10], *need[17:21]), lora)
        return (*grads[:10], None, None, None, None, None, None, None, *grads[10:], None)
