"""Flash-style attention over strided q/k/v with an optional extra key/value token per sequence.

    out[b, i, h] = softmax_j(scale * q[b, i, h] . [k[b, :, h]; ek[b, h]]) @ [v[b, :, h]; ev[b, h]]

Shapes (any strides, last dimension contiguous): ``q: [B, SQ, H, D]``, ``k, v: [B, SK, H, D]``,
``ek, ev: [B, H, D]``, ``out: [B, SQ, H, D]``, ``lse: [B, H, SQ]`` (fp32, fp64 for fp64 inputs).

X-CLIP uses it twice per layer: intra-frame attention (B = frames, S = l tokens, the frame's
message token as the extra key/value: the concatenation [x; msg] is never built) and cross-frame
message attention (B = videos, S = T frames, no extra token).

Ideas of the kernels:
- The extra token seeds the online-softmax state (``m = s_extra, l = 1, acc = v_extra``), so the
  loop over keys is the plain flash loop.
- Small sequences (the message attention at T = 8..32) are *packed*: G sequences share one
  program, rows and columns are mapped to ``(sequence, position)`` and a block-diagonal mask keeps
  the sequences apart. With G = 1 the same code is the ordinary tiled kernel.
- Packed tiles keep non-finite values inside their own sequence: a masked probability of 0 times
  another sequence's NaN would be NaN, so operands shared across sequences in one ``tl.dot`` are
  loaded with non-finite entries zeroed, and the rows of a sequence that held one are set to NaN
  at the end (as unpacked attention would give them). One corrupt clip never spoils its batch.
- Scores are kept in base 2 (``scale * log2(e)`` folded in) and ``lse`` is stored in base 2.
- Backward has no atomics: one program per key tile builds dk/dv over all query tiles (the
  program of key tile 0 also owns the extra token's dk/dv), one program per query tile builds dq.
  Results are bit-identical from run to run. The two passes are one jit function compiled twice
  (``DKDV``), under two names, ``_attention_bwd_dkdv`` and ``_attention_bwd_dq``, so that a profiler
  and a disassembly tell them apart; each of the three backward launches (``delta``, ``dkdv``,
  ``dq``) can run on its own (:func:`attention_bwd`'s ``passes``), which the tuner and the lab time.
- Accumulators are fp32 (fp64 for fp64 inputs); the softmax scale travels as two fp32 numbers
  (hi + lo) because Triton passes Python floats as fp32, which would cost fp64 inputs precision.
  The kernels cast both to fp32 on entry, so a caller that passes them as fp64 (Inductor may)
  gets the same arithmetic.

Launches go through ``xclip_fast.kernels.wrap_triton``: inside a ``torch.library.triton_op`` traced by
``torch.compile`` the kernels then appear in the graph; in eager mode it returns the kernel itself.
"""

from __future__ import annotations

import functools
import struct
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import cdiv, wrap_triton
from .plan import LOG2E, pack_group, plan_for
from .tiles import bad_rows, col_ptrs, extra_grads, is_finite, load_extra, positions, row_ptrs, scaled

__all__ = ["attention_fwd", "attention_bwd", "launch_name", "MAX_HEAD_DIM", "BWD_PASSES"]

MAX_HEAD_DIM = 128  # register tiles of up to 128 columns (ptxas reports, xclip_fast/kernels/plan.py)
BWD_PASSES = ("delta", "dkdv", "dq")  # the backward's launches, in order


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    q, k, v, ek, ev, o, lse,  # q/o: [B, SQ, H, D], k/v: [B, SK, H, D], ek/ev: [B, H, D], lse: [B, H, SQ]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_lse_b, stride_lse_h,
    B, H, SQ, SK, G,  # G: sequences packed in one program (1 = not packed)
    scale_hi, scale_lo,  # scale * log2(e) = scale_hi + scale_lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    tl.static_assert(not (HAS_EXTRA and PACKED), "the extra token is per sequence: packed tiles cannot hold it")
    i_gh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G

    # virtual rows r -> (sequence g, position i); with G == 1 this is the plain query tile
    o_rg, o_rb, o_ri, m_r = positions(i_m * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM

    b_q = tl.load(row_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d),
                  mask=m_r[:, None] & m_d[None, :], other=0.0)

    if HAS_EXTRA:
        # seed the online softmax with the extra token (G == 1 here: one sequence per program)
        b_ek, b_ev = load_extra(ek, ev, i_b0, i_h, stride_ek_b, stride_ek_h, stride_ev_b, stride_ev_h, o_d, m_d,
                                 ACC)
        b_m = scaled(tl.sum(b_q.to(ACC) * b_ek[None, :], axis=1), scale_hi, scale_lo, ACC)
        b_l = tl.full([BLOCK_M], 1.0, ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC) + b_ev[None, :]
    else:
        b_m = tl.full([BLOCK_M], float("-inf"), ACC)
        b_l = tl.zeros([BLOCK_M], ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    b_bad = tl.zeros([BLOCK_M], tl.int32)  # packed: rows whose own sequence holds a non-finite value

    for start_n in range(0, G * SK, BLOCK_N):
        o_cg, o_cb, o_cj, m_c = positions(start_n, BLOCK_N, SK, G, i_b0, B)

        b_kt = tl.load(col_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d),
                       mask=m_d[:, None] & m_c[None, :], other=0.0)
        # [BM, BD] @ [BD, BN]
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC)
        b_s = scaled(b_s, scale_hi, scale_lo, ACC)
        m_s = m_c[None, :]
        if PACKED:
            m_s = m_s & (o_rg[:, None] == o_cg[None, :])
        b_s = tl.where(m_s, b_s, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        # a row that has seen no valid key yet keeps m = -inf; shift by 0 instead (no inf - inf)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)

        b_v = tl.load(row_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d),
                      mask=m_c[:, None] & m_d[None, :], other=0.0)
        if PACKED:
            # P @ V sums over every sequence of the tile: keep another sequence's NaN out of it
            b_bad = tl.maximum(b_bad, tl.max(tl.where(m_s & (bad_rows(b_v, 1)[None, :] > 0), 1, 0), axis=1))
            b_v = tl.where(is_finite(b_v), b_v, 0.0)
        # [BM, BN] @ [BN, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(
            b_p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=ACC
        )
        b_m = b_m_new

    b_l_safe = tl.where(m_r, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    if PACKED:
        b_o = tl.where(b_bad[:, None] > 0, float("nan"), b_o)
    p_o = row_ptrs(o, o_rb, o_ri, i_h, stride_o_b, stride_o_s, stride_o_h, o_d)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    p_lse = lse + o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
    tl.store(p_lse, b_m + tl.log2(b_l_safe), mask=m_r)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    o, do, delta,  # o/do: [B, SQ, H, D], delta: [B, H, SQ]
    stride_o_b, stride_o_s, stride_o_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_delta_b, stride_delta_h,
    H, SQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < SQ
    o_i64 = o_i.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_id = m_i[:, None] & (o_d < HEAD_DIM)[None, :]
    p_o = o + i_b * stride_o_b + o_i64[:, None] * stride_o_s + i_h * stride_o_h + o_d[None, :]
    p_do = do + i_b * stride_do_b + o_i64[:, None] * stride_do_s + i_h * stride_do_h + o_d[None, :]
    b_o = tl.load(p_o, mask=m_id, other=0.0).to(ACC)
    b_do = tl.load(p_do, mask=m_id, other=0.0).to(ACC)
    p_delta = delta + i_b * stride_delta_b + i_h * stride_delta_h + o_i64
    tl.store(p_delta, tl.sum(b_o * b_do, axis=1), mask=m_i)


def _bwd_name(spec) -> str:
    """The name each backward pass compiles to (``triton.jit(repr=...)``: what profilers, Nsight and
    ``cuobjdump`` show): ``spec.constants`` holds the launch's compile-time arguments by name."""
    dkdv = spec.constants.get("DKDV")
    return "_attention_bwd_dkdv" if bool(getattr(dkdv, "value", dkdv)) else "_attention_bwd_dq"


@triton.jit(repr=_bwd_name)
def _attention_bwd_kernel(
    q, k, v, ek, ev, do, lse, delta,  # as forward; do: [B, SQ, H, D]; lse/delta: [B, H, SQ]
    dq, dk, dv, dek, dev,  # dq: [B, SQ, H, D], dk/dv: [B, SK, H, D], dek/dev: [B, H, D]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_lse_b, stride_lse_h,  # delta shares lse's layout (made by the launcher)
    stride_dq_b, stride_dq_s, stride_dq_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    stride_dek_b, stride_dek_h,
    stride_dev_b, stride_dev_h,
    B, H, SQ, SK, G,
    scale_hi, scale_lo, dscale_hi, dscale_lo,  # scale * log2(e) and scale, each as fp32 hi + lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DKDV: tl.constexpr,  # True: the dk/dv pass (one program per key tile); False: the dq pass (per query tile)
):
    """The two backward passes share this signature; ``DKDV`` selects one at compile time, so each
    launch compiles to the code of its own pass. Neither pass uses atomics."""
    tl.static_assert(not (HAS_EXTRA and PACKED), "the extra token is per sequence: packed tiles cannot hold it")
    i_gh = tl.program_id(0)
    i_t = tl.program_id(1)  # the key tile (dk/dv pass) or the query tile (dq pass) of this program
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    if HAS_EXTRA:
        b_ek, b_ev = load_extra(ek, ev, i_b0, i_h, stride_ek_b, stride_ek_h, stride_ev_b, stride_ev_h, o_d, m_d,
                                 ACC)

    if DKDV:
        o_cg, o_cb, o_cj, m_c = positions(i_t * BLOCK_N, BLOCK_N, SK, G, i_b0, B)
        m_cd = m_c[:, None] & m_d[None, :]
        b_k = tl.load(row_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d), mask=m_cd, other=0.0)
        b_v = tl.load(row_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d), mask=m_cd, other=0.0)
        b_dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        b_dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        # packed: keys whose own sequence holds a non-finite value that reaches their dk (q, do, lse,
        # delta) or their dv (q, do, lse: dv = P^T dO does not involve delta)
        b_bad_k = tl.zeros([BLOCK_N], tl.int32)
        b_bad_v = tl.zeros([BLOCK_N], tl.int32)

        for start_m in range(0, G * SQ, BLOCK_M):
            o_rg, o_rb, o_ri, m_r = positions(start_m, BLOCK_M, SQ, G, i_b0, B)
            b_qt = tl.load(col_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d),
                           mask=m_d[:, None] & m_r[None, :], other=0.0)
            b_do = tl.load(row_ptrs(do, o_rb, o_ri, i_h, stride_do_b, stride_do_s, stride_do_h, o_d),
                           mask=m_r[:, None] & m_d[None, :], other=0.0)
            o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
            b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
            b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)

            m_s = m_c[:, None] & m_r[None, :]
            if PACKED:
                m_s = m_s & (o_cg[:, None] == o_rg[None, :])
                # the products below sum over the queries of every sequence of the tile
                b_rbad = bad_rows(b_qt, 0) + bad_rows(b_do, 1) + tl.where(is_finite(b_lse), 0, 1)
                b_bad_v = tl.maximum(b_bad_v, tl.max(tl.where(m_s & (b_rbad[None, :] > 0), 1, 0), axis=1))
                b_rbad += tl.where(is_finite(b_delta), 0, 1)
                b_bad_k = tl.maximum(b_bad_k, tl.max(tl.where(m_s & (b_rbad[None, :] > 0), 1, 0), axis=1))
                b_qt = tl.where(is_finite(b_qt), b_qt, 0.0)
                b_do = tl.where(is_finite(b_do), b_do, 0.0)

            # [BN, BD] @ [BD, BM]: scores transposed, keys on rows
            b_st = scaled(tl.dot(b_k, b_qt, input_precision=PRECISION, out_dtype=ACC), scale_hi, scale_lo, ACC)
            b_pt = tl.where(m_s, tl.exp2(b_st - b_lse[None, :]), 0.0)
            # [BN, BM] @ [BM, BD]
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION, out_dtype=ACC)
            # [BN, BD] @ [BD, BM]
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION, out_dtype=ACC)
            b_dst = tl.where(m_s, b_pt * (b_dpt - b_delta[None, :]), 0.0)
            # [BN, BM] @ [BM, BD]
            b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION, out_dtype=ACC)

        # d(score)/dk = natural scale * q: applied once here (dscale_hi + dscale_lo = scale)
        b_dk = scaled(b_dk, dscale_hi, dscale_lo, ACC)
        if PACKED:
            b_dk = tl.where(b_bad_k[:, None] > 0, float("nan"), b_dk)
            b_dv = tl.where(b_bad_v[:, None] > 0, float("nan"), b_dv)
        p_dk = row_ptrs(dk, o_cb, o_cj, i_h, stride_dk_b, stride_dk_s, stride_dk_h, o_d)
        p_dv = row_ptrs(dv, o_cb, o_cj, i_h, stride_dv_b, stride_dv_s, stride_dv_h, o_d)
        tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_cd)
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_cd)
        if HAS_EXTRA:
            if i_t == 0:  # key tile 0 also owns the extra token's dk/dv: one more pass over the queries
                # in its own loop, with q and dO read again as rows, never as the operands of the dots
                # above (on sm_90 with fp16, computing it inside that loop from tl.trans of the dot's
                # q operand gave a wrong dk for the tile's keys: error 0.26 on an H200, triton 3.6)
                b_dek = tl.zeros([BLOCK_D], ACC)
                b_dev = tl.zeros([BLOCK_D], ACC)
                for start_m in range(0, SQ, BLOCK_M):  # G == 1 with the extra token
                    o_rg, o_rb, o_ri, m_r = positions(start_m, BLOCK_M, SQ, 1, i_b0, B)
                    m_rd = m_r[:, None] & m_d[None, :]
                    b_q = tl.load(row_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d), mask=m_rd,
                                  other=0.0).to(ACC)
                    b_do = tl.load(row_ptrs(do, o_rb, o_ri, i_h, stride_do_b, stride_do_s, stride_do_h, o_d),
                                   mask=m_rd, other=0.0).to(ACC)
                    o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
                    b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
                    b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)
                    b_pe, b_dse = extra_grads(b_q, b_do, b_lse, b_delta, b_ek, b_ev, m_r, scale_hi, scale_lo, ACC)
                    b_dev += tl.sum(b_pe[:, None] * b_do, axis=0)
                    b_dek += tl.sum(b_dse[:, None] * b_q, axis=0)
                b_dek = scaled(b_dek, dscale_hi, dscale_lo, ACC)
                tl.store(dek + i_b0 * stride_dek_b + i_h * stride_dek_h + o_d, b_dek.to(dek.dtype.element_ty),
                         mask=m_d)
                tl.store(dev + i_b0 * stride_dev_b + i_h * stride_dev_h + o_d, b_dev.to(dev.dtype.element_ty),
                         mask=m_d)
    else:
        o_rg, o_rb, o_ri, m_r = positions(i_t * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
        m_rd = m_r[:, None] & m_d[None, :]
        b_q = tl.load(row_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d), mask=m_rd, other=0.0)
        b_do = tl.load(row_ptrs(do, o_rb, o_ri, i_h, stride_do_b, stride_do_s, stride_do_h, o_d), mask=m_rd, other=0.0)
        o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
        b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
        b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)
        b_dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        b_bad = tl.zeros([BLOCK_M], tl.int32)  # packed: rows whose own sequence holds a non-finite key
        if HAS_EXTRA:
            _, b_dse = extra_grads(b_q.to(ACC), b_do.to(ACC), b_lse, b_delta, b_ek, b_ev, m_r, scale_hi, scale_lo,
                                   ACC)
            b_dq += b_dse[:, None] * b_ek[None, :]

        for start_n in range(0, G * SK, BLOCK_N):
            o_cg, o_cb, o_cj, m_c = positions(start_n, BLOCK_N, SK, G, i_b0, B)
            m_dc = m_d[:, None] & m_c[None, :]
            b_kt = tl.load(col_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d), mask=m_dc, other=0.0)
            b_vt = tl.load(col_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d), mask=m_dc, other=0.0)
            m_s = m_r[:, None] & m_c[None, :]
            if PACKED:
                m_s = m_s & (o_rg[:, None] == o_cg[None, :])
            # [BM, BD] @ [BD, BN]
            b_s = scaled(tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC), scale_hi, scale_lo, ACC)
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
            # [BM, BD] @ [BD, BN]
            b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION, out_dtype=ACC)
            # a row's own non-finite values reach its dq through b_ds; other sequences' stay out
            b_ds = tl.where(m_s, b_p * (b_dp - b_delta[:, None]), 0.0)
            if PACKED:  # dS @ K sums over the keys of every sequence: zero the non-finite keys, flag their rows
                b_bad = tl.maximum(b_bad, tl.max(tl.where(m_s & (bad_rows(b_kt, 0)[None, :] > 0), 1, 0), axis=1))
                b_kt = tl.where(is_finite(b_kt), b_kt, 0.0)
            # [BM, BN] @ [BN, BD]
            b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION, out_dtype=ACC)

        b_dq = scaled(b_dq, dscale_hi, dscale_lo, ACC)
        if PACKED:
            b_dq = tl.where(b_bad[:, None] > 0, float("nan"), b_dq)
        p_dq = row_ptrs(dq, o_rb, o_ri, i_h, stride_dq_b, stride_dq_s, stride_dq_h, o_d)
        tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_rd)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _split_exact(s):
    hi = struct.unpack("f", struct.pack("f", s))[0]
    return hi, struct.unpack("f", struct.pack("f", s - hi))[0]


_split_float = functools.lru_cache(maxsize=64)(_split_exact)  # (a module's scale is the same on every call)


def _split(s: float):
    """``s`` as fp32 hi + fp32 lo (Triton passes Python floats as fp32). Plain Python arithmetic:
    no tensor is made, so this also runs while a graph is being traced; a Python float's split is
    remembered."""
    return _split_float(s) if type(s) is float else _split_exact(s)


def _strides(t: torch.Tensor, n: int):
    """The first ``n`` strides of ``t`` (one call: this runs for every tensor of every launch)."""
    strides = t.stride()
    # the kernels address the last dimension with stride 1; a size-1 last dimension is never strided
    assert strides[-1] == 1 or t.shape[-1] == 1, "last dimension must be contiguous"
    return strides[:n]


def _extra_strides(ek, ev, has_extra: bool):
    return (*_strides(ek, 2), *_strides(ev, 2)) if has_extra else (0, 0, 0, 0)


def attention_fwd(q, k, v, ek, ev, o, lse, scale: float, allow_tf32: bool = False, plan=None) -> None:
    """Forward launcher: writes ``o`` ([B, SQ, H, D], any strides) and ``lse`` ([B, H, SQ]).

    Inputs are validated by the caller (``xclip_fast.ops``); here only internal invariants are
    asserted. ``ek``/``ev`` are both None or both [B, H, D]. ``plan``: a :class:`LaunchPlan` to use
    instead of the one :func:`plan_for` chooses (the tuner times candidates this way).
    """
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    has_extra = ek is not None
    plan = plan or plan_for(q, SK, has_extra, allow_tf32)
    G = pack_group(plan, SQ, SK)
    if not has_extra:
        ek = ev = q  # never read (HAS_EXTRA is False); any valid pointer will do
    t = plan.fwd
    grid = (cdiv(B, G) * H, cdiv(G * SQ, t.block_m))
    wrap_triton(_attention_fwd_kernel)[grid](
        q, k, v, ek, ev, o, lse,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(o, 3), lse.stride(0), lse.stride(1),
        B, H, SQ, SK, G, *_split(scale * LOG2E),
        **plan.constexprs(G > 1), BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def attention_bwd(q, k, v, ek, ev, o, lse, do, dq, dk, dv, dek, dev, scale: float,
                  allow_tf32: bool = False, plan=None, passes=BWD_PASSES, delta=None) -> None:
    """Backward launcher: writes ``dq, dk, dv`` (and ``dek, dev`` with the extra token).

    Every output is fully written (no accumulation into existing values), deterministically.
    ``plan`` as in :func:`attention_fwd`. ``passes``: which of the three launches of
    :data:`BWD_PASSES` to run, in that order (all by default; the tuner and the lab time each one
    alone); ``delta`` (``lse``'s shape and strides): the buffer of the ``delta`` pass, which the other
    two read (made here when None; it must then hold that pass's result if the pass is not run).
    """
    assert passes is BWD_PASSES or not set(passes) - set(BWD_PASSES), f"unknown backward passes {passes}"
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    has_extra = ek is not None
    plan = plan or plan_for(q, SK, has_extra, allow_tf32)
    G = pack_group(plan, SQ, SK)
    consts = plan.constexprs(G > 1)
    if not has_extra:
        ek = ev = dek = dev = q  # never touched
    if delta is None:
        assert "delta" in passes, "the dk/dv and dq passes read delta: run its pass or pass its buffer"
        delta = torch.empty_like(lse)
    assert delta.stride() == lse.stride()
    if "delta" in passes:
        pre = plan.preprocess
        wrap_triton(_attention_bwd_preprocess_kernel)[(B * H, cdiv(SQ, pre.block_m))](
            o, do, delta, *_strides(o, 3), *_strides(do, 3), delta.stride(0), delta.stride(1), H, SQ,
            HEAD_DIM=plan.head_dim, BLOCK_M=pre.block_m, BLOCK_D=plan.block_d, ACC=plan.acc,
            num_warps=pre.num_warps,
        )
    args = (
        q, k, v, ek, ev, do, lse, delta, dq, dk, dv, dek, dev,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(do, 3), lse.stride(0), lse.stride(1),
        *_strides(dq, 3), *_strides(dk, 3), *_strides(dv, 3), *_extra_strides(dek, dev, has_extra),
        B, H, SQ, SK, G, *_split(scale * LOG2E), *_split(scale),
    )
    groups_h = cdiv(B, G) * H
    for name, dkdv, t, tiles in (("dkdv", True, plan.dkdv, cdiv(G * SK, plan.dkdv.block_n)),
                                 ("dq", False, plan.dq, cdiv(G * SQ, plan.dq.block_m))):
        if name in passes:
            wrap_triton(_attention_bwd_kernel)[(groups_h, tiles)](
                *args, **consts, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DKDV=dkdv, num_warps=t.num_warps,
                num_stages=t.num_stages,
            )


def launch_name(kernel, constexprs: dict) -> str:
    """The name a launch of the jit function ``kernel`` with the compile-time arguments ``constexprs``
    compiles to, as profilers report it (the two backward passes have names of their own)."""
    if kernel is _attention_bwd_kernel:
        return _bwd_name(SimpleNamespace(constants=constexprs))
    return getattr(kernel, "fn", kernel).__name__
