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
- Scores are kept in base 2 (``scale * log2(e)`` folded in) and ``lse`` is stored in base 2.
- Backward has no atomics: one program per key tile builds dk/dv over all query tiles (the
  program of key tile 0 also owns the extra token's dk/dv), one program per query tile builds dq.
  Results are bit-identical from run to run.
- Accumulators are fp32 (fp64 for fp64 inputs); the softmax scale travels as two fp32 numbers
  (hi + lo) because Triton passes Python floats as fp32, which would cost fp64 inputs precision.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd", "launch_plan", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scale(b, hi, lo, ACC: tl.constexpr):
    """``b * (hi + lo)``: the scale travels as two fp32 numbers so fp64 inputs keep fp64 precision."""
    if ACC == tl.float64:
        b = b * hi + b * lo
    else:
        b = b * hi
    return b


@triton.jit
def _positions(start, SIZE: tl.constexpr, S, G, i_b0, B):
    """Virtual indices ``start + [0, SIZE)`` of a group of G sequences of length S -> (sequence in
    the group, batch index, position as int64, valid). With G == 1 this is a plain tile."""
    o = start + tl.arange(0, SIZE)
    o_g = o // S
    o_b = i_b0 + o_g
    o_i = (o - o_g * S).to(tl.int64)
    return o_g, o_b, o_i, (o < G * S) & (o_b < B)


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
    i_gh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G

    # virtual rows r -> (sequence g, position i); with G == 1 this is the plain query tile
    o_rg, o_rb, o_ri, m_r = _positions(i_m * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM

    p_q = q + o_rb[:, None] * stride_q_b + o_ri[:, None] * stride_q_s + i_h * stride_q_h + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)

    if HAS_EXTRA:
        # seed the online softmax with the extra token (G == 1 here: one sequence per program)
        p_ek = ek + i_b0 * stride_ek_b + i_h * stride_ek_h + o_d
        p_ev = ev + i_b0 * stride_ev_b + i_h * stride_ev_h + o_d
        b_ek = tl.load(p_ek, mask=m_d, other=0.0).to(ACC)
        b_ev = tl.load(p_ev, mask=m_d, other=0.0).to(ACC)
        b_se = tl.sum(b_q.to(ACC) * b_ek[None, :], axis=1)
        b_m = _scale(b_se, scale_hi, scale_lo, ACC)
        b_l = tl.full([BLOCK_M], 1.0, ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC) + b_ev[None, :]
    else:
        b_m = tl.full([BLOCK_M], float("-inf"), ACC)
        b_l = tl.zeros([BLOCK_M], ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    for start_n in range(0, G * SK, BLOCK_N):
        o_cg, o_cb, o_cj, m_c = _positions(start_n, BLOCK_N, SK, G, i_b0, B)

        p_kt = k + o_cb[None, :] * stride_k_b + o_cj[None, :] * stride_k_s + i_h * stride_k_h + o_d[:, None]
        b_kt = tl.load(p_kt, mask=m_d[:, None] & m_c[None, :], other=0.0)
        # [BM, BD] @ [BD, BN]
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC)
        b_s = _scale(b_s, scale_hi, scale_lo, ACC)
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

        p_v = v + o_cb[:, None] * stride_v_b + o_cj[:, None] * stride_v_s + i_h * stride_v_h + o_d[None, :]
        b_v = tl.load(p_v, mask=m_c[:, None] & m_d[None, :], other=0.0)
        # [BM, BN] @ [BN, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(
            b_p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=ACC
        )
        b_m = b_m_new

    b_l_safe = tl.where(m_r, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    p_o = o + o_rb[:, None] * stride_o_b + o_ri[:, None] * stride_o_s + i_h * stride_o_h + o_d[None, :]
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


@triton.jit
def _attention_bwd_dkdv_kernel(
    q, k, v, ek, ev, do, lse, delta,  # as forward; do: [B, SQ, H, D]; lse/delta: [B, H, SQ]
    dk, dv, dek, dev,  # dk/dv: [B, SK, H, D], dek/dev: [B, H, D]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_lse_b, stride_lse_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    stride_dek_b, stride_dek_h,
    stride_dev_b, stride_dev_h,
    B, H, SQ, SK, G,
    scale_hi, scale_lo, dscale_hi, dscale_lo,  # scale * log2(e) and scale, each as fp32 hi + lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # delta and lse share one layout ([B, H, SQ], made by the launcher)
    i_gh = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G

    o_cg, o_cb, o_cj, m_c = _positions(i_n * BLOCK_N, BLOCK_N, SK, G, i_b0, B)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_cd = m_c[:, None] & m_d[None, :]

    p_k = k + o_cb[:, None] * stride_k_b + o_cj[:, None] * stride_k_s + i_h * stride_k_h + o_d[None, :]
    p_v = v + o_cb[:, None] * stride_v_b + o_cj[:, None] * stride_v_s + i_h * stride_v_h + o_d[None, :]
    b_k = tl.load(p_k, mask=m_cd, other=0.0)
    b_v = tl.load(p_v, mask=m_cd, other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)

    owns_extra = i_n == 0
    if HAS_EXTRA:
        p_ek = ek + i_b0 * stride_ek_b + i_h * stride_ek_h + o_d
        p_ev = ev + i_b0 * stride_ev_b + i_h * stride_ev_h + o_d
        b_ek = tl.load(p_ek, mask=m_d, other=0.0).to(ACC)
        b_ev = tl.load(p_ev, mask=m_d, other=0.0).to(ACC)
        b_dek = tl.zeros([BLOCK_D], ACC)
        b_dev = tl.zeros([BLOCK_D], ACC)

    for start_m in range(0, G * SQ, BLOCK_M):
        o_rg, o_rb, o_ri, m_r = _positions(start_m, BLOCK_M, SQ, G, i_b0, B)
        m_rd = m_r[:, None] & m_d[None, :]

        p_qt = q + o_rb[None, :] * stride_q_b + o_ri[None, :] * stride_q_s + i_h * stride_q_h + o_d[:, None]
        p_do = do + o_rb[:, None] * stride_do_b + o_ri[:, None] * stride_do_s + i_h * stride_do_h + o_d[None, :]
        b_qt = tl.load(p_qt, mask=m_d[:, None] & m_r[None, :], other=0.0)
        b_do = tl.load(p_do, mask=m_rd, other=0.0)
        o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
        b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
        b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)

        # [BN, BD] @ [BD, BM]: scores transposed, keys on rows
        b_st = tl.dot(b_k, b_qt, input_precision=PRECISION, out_dtype=ACC)
        b_st = _scale(b_st, scale_hi, scale_lo, ACC)
        m_s = m_c[:, None] & m_r[None, :]
        if PACKED:
            m_s = m_s & (o_cg[:, None] == o_rg[None, :])
        b_pt = tl.where(m_s, tl.exp2(b_st - b_lse[None, :]), 0.0)
        # [BN, BM] @ [BM, BD]
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION, out_dtype=ACC)
        # [BN, BD] @ [BD, BM]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION, out_dtype=ACC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        # [BN, BM] @ [BM, BD]
        b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION, out_dtype=ACC)

        if HAS_EXTRA:
            if owns_extra:
                b_q = tl.trans(b_qt).to(ACC)
                b_se = tl.sum(b_q * b_ek[None, :], axis=1)
                b_se = _scale(b_se, scale_hi, scale_lo, ACC)
                b_pe = tl.where(m_r, tl.exp2(b_se - b_lse), 0.0)
                b_do_acc = b_do.to(ACC)
                b_dev += tl.sum(b_pe[:, None] * b_do_acc, axis=0)
                b_dse = b_pe * (tl.sum(b_do_acc * b_ev[None, :], axis=1) - b_delta)
                b_dek += tl.sum(b_dse[:, None] * b_q, axis=0)

    # d(score)/dk = natural scale * q: applied once here (dscale_hi + dscale_lo = scale)
    b_dk = _scale(b_dk, dscale_hi, dscale_lo, ACC)
    p_dk = dk + o_cb[:, None] * stride_dk_b + o_cj[:, None] * stride_dk_s + i_h * stride_dk_h + o_d[None, :]
    p_dv = dv + o_cb[:, None] * stride_dv_b + o_cj[:, None] * stride_dv_s + i_h * stride_dv_h + o_d[None, :]
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_cd)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_cd)
    if HAS_EXTRA:
        if owns_extra:
            p_dek = dek + i_b0 * stride_dek_b + i_h * stride_dek_h + o_d
            p_dev = dev + i_b0 * stride_dev_b + i_h * stride_dev_h + o_d
            b_dek = _scale(b_dek, dscale_hi, dscale_lo, ACC)
            tl.store(p_dek, b_dek.to(dek.dtype.element_ty), mask=m_d)
            tl.store(p_dev, b_dev.to(dev.dtype.element_ty), mask=m_d)


@triton.jit
def _attention_bwd_dq_kernel(
    q, k, v, ek, ev, do, lse, delta,  # as forward; do: [B, SQ, H, D]; lse/delta: [B, H, SQ]
    dq,  # [B, SQ, H, D]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_lse_b, stride_lse_h,
    stride_dq_b, stride_dq_s, stride_dq_h,
    B, H, SQ, SK, G,
    scale_hi, scale_lo, dscale_hi, dscale_lo,  # scale * log2(e) and scale, each as fp32 hi + lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    i_gh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G

    o_rg, o_rb, o_ri, m_r = _positions(i_m * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_rd = m_r[:, None] & m_d[None, :]

    p_q = q + o_rb[:, None] * stride_q_b + o_ri[:, None] * stride_q_s + i_h * stride_q_h + o_d[None, :]
    p_do = do + o_rb[:, None] * stride_do_b + o_ri[:, None] * stride_do_s + i_h * stride_do_h + o_d[None, :]
    b_q = tl.load(p_q, mask=m_rd, other=0.0)
    b_do = tl.load(p_do, mask=m_rd, other=0.0)
    o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
    b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
    b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    if HAS_EXTRA:
        p_ek = ek + i_b0 * stride_ek_b + i_h * stride_ek_h + o_d
        p_ev = ev + i_b0 * stride_ev_b + i_h * stride_ev_h + o_d
        b_ek = tl.load(p_ek, mask=m_d, other=0.0).to(ACC)
        b_ev = tl.load(p_ev, mask=m_d, other=0.0).to(ACC)
        b_se = tl.sum(b_q.to(ACC) * b_ek[None, :], axis=1)
        b_se = _scale(b_se, scale_hi, scale_lo, ACC)
        b_pe = tl.where(m_r, tl.exp2(b_se - b_lse), 0.0)
        b_dse = b_pe * (tl.sum(b_do.to(ACC) * b_ev[None, :], axis=1) - b_delta)
        b_dq += b_dse[:, None] * b_ek[None, :]

    for start_n in range(0, G * SK, BLOCK_N):
        o_cg, o_cb, o_cj, m_c = _positions(start_n, BLOCK_N, SK, G, i_b0, B)

        p_kt = k + o_cb[None, :] * stride_k_b + o_cj[None, :] * stride_k_s + i_h * stride_k_h + o_d[:, None]
        p_vt = v + o_cb[None, :] * stride_v_b + o_cj[None, :] * stride_v_s + i_h * stride_v_h + o_d[:, None]
        b_kt = tl.load(p_kt, mask=m_d[:, None] & m_c[None, :], other=0.0)
        b_vt = tl.load(p_vt, mask=m_d[:, None] & m_c[None, :], other=0.0)
        # [BM, BD] @ [BD, BN]
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC)
        b_s = _scale(b_s, scale_hi, scale_lo, ACC)
        m_s = m_r[:, None] & m_c[None, :]
        if PACKED:
            m_s = m_s & (o_rg[:, None] == o_cg[None, :])
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
        # [BM, BD] @ [BD, BN]
        b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION, out_dtype=ACC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        # [BM, BN] @ [BN, BD]
        b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION, out_dtype=ACC)

    b_dq = _scale(b_dq, dscale_hi, dscale_lo, ACC)
    p_dq = dq + o_rb[:, None] * stride_dq_b + o_ri[:, None] * stride_dq_s + i_h * stride_dq_h + o_d[None, :]
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_rd)


# ----------------------------------------------------------------------------------------------
# launch plan and launchers
# ----------------------------------------------------------------------------------------------
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@functools.lru_cache(maxsize=256)
def launch_plan(head_dim: int, dtype: torch.dtype, sq: int, sk: int, has_extra: bool,
                allow_tf32: bool) -> dict:
    """Every launch choice of the kernels for one problem (tests compile each one ahead of time).

    Returns the constexprs shared by the kernels, the packing factor ``G`` and, per kernel
    (``"fwd"``, ``"dkdv"``, ``"dq"``), its tile sizes, warps and stages. Tiles depend only on the
    head dim and the dtype (chosen from sm_90 register/spill reports of ``ptxas``); the sequence
    lengths only decide ``G``, a runtime argument, so a new frame count never recompiles (beyond
    Triton's own specialisation of integers equal to 1 or divisible by 16). Every ``tl.dot``
    dimension is at least 16 (a GPU requirement the interpreter does not enforce). Cached: the
    launchers call it on every launch; treat the result as read-only.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype in (torch.float32, torch.float64):
        fwd = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)
        dkdv = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4)
        dq = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)
    elif block_d <= 64:
        fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
        dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    else:
        fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)
        dkdv = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)
    for cfg in (fwd, dkdv, dq):
        cfg["num_stages"] = 2
    # pack several short sequences into one program (block-diagonal mask); the extra token is
    # per sequence and seeds the whole tile, so packing is only used without it
    group = 1
    if not has_extra and 2 * sq <= fwd["BLOCK_M"] and 2 * sk <= fwd["BLOCK_N"]:
        group = min(fwd["BLOCK_M"] // sq, fwd["BLOCK_N"] // sk)
    if dtype == torch.float32 and allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"  # exact fp32 / fp64; ignored for 16-bit inputs
    return dict(
        constexprs=dict(
            HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_EXTRA=has_extra, PACKED=group > 1,
            PRECISION=precision, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        ),
        G=group, fwd=fwd, dkdv=dkdv, dq=dq,
    )


def _split(s: float):
    """``s`` as fp32 hi + fp32 lo (Triton passes Python floats as fp32)."""
    hi = float(torch.tensor(s, dtype=torch.float32))
    lo = float(torch.tensor(s - hi, dtype=torch.float32))
    return hi, lo


def _strides(t: torch.Tensor, n: int):
    assert t.stride(-1) == 1, "last dimension must be contiguous"
    return tuple(t.stride(i) for i in range(n))


def _extra_strides(ek, ev, has_extra: bool):
    return (*_strides(ek, 2), *_strides(ev, 2)) if has_extra else (0, 0, 0, 0)


def _launch(kernel, grid, args, plan, name):
    cfg = plan[name]
    kernel[grid](*args, **plan["constexprs"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def attention_fwd(q, k, v, ek, ev, o, lse, scale: float, allow_tf32: bool = False) -> None:
    """Forward launcher: writes ``o`` ([B, SQ, H, D], any strides) and ``lse`` ([B, H, SQ]).

    Inputs are validated by the caller (``xclip_fast.ops``); here only internal invariants are
    asserted. ``ek``/``ev`` are both None or both [B, H, D].
    """
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    has_extra = ek is not None
    plan = launch_plan(D, q.dtype, SQ, SK, has_extra, allow_tf32)
    G = plan["G"]
    if not has_extra:
        ek = ev = q  # never read (HAS_EXTRA is False); any valid pointer will do
    grid = (triton.cdiv(B, G) * H, triton.cdiv(G * SQ, plan["fwd"]["BLOCK_M"]))
    args = (
        q, k, v, ek, ev, o, lse,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(o, 3), lse.stride(0), lse.stride(1),
        B, H, SQ, SK, G, *_split(scale * LOG2E),
    )
    _launch(_attention_fwd_kernel, grid, args, plan, "fwd")


def attention_bwd(q, k, v, ek, ev, o, lse, do, dq, dk, dv, dek, dev, scale: float,
                  allow_tf32: bool = False) -> None:
    """Backward launcher: writes ``dq, dk, dv`` (and ``dek, dev`` with the extra token).

    Every output is fully written (no accumulation into existing values), deterministically.
    """
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    has_extra = ek is not None
    plan = launch_plan(D, q.dtype, SQ, SK, has_extra, allow_tf32)
    G = plan["G"]
    consts = plan["constexprs"]
    if not has_extra:
        ek = ev = dek = dev = q  # never touched
    delta = torch.empty_like(lse)
    assert delta.stride() == lse.stride()
    _attention_bwd_preprocess_kernel[(B * H, triton.cdiv(SQ, 64))](
        o, do, delta, *_strides(o, 3), *_strides(do, 3), delta.stride(0), delta.stride(1),
        H, SQ, HEAD_DIM=D, BLOCK_M=64, BLOCK_D=consts["BLOCK_D"], ACC=consts["ACC"], num_warps=4,
    )
    scales = (*_split(scale * LOG2E), *_split(scale))
    shared = (
        q, k, v, ek, ev, do, lse, delta,
    )
    strides = (
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(do, 3), lse.stride(0), lse.stride(1),
    )
    groups_h = triton.cdiv(B, G) * H
    _launch(
        _attention_bwd_dkdv_kernel, (groups_h, triton.cdiv(G * SK, plan["dkdv"]["BLOCK_N"])),
        (*shared, dk, dv, dek, dev, *strides, *_strides(dk, 3), *_strides(dv, 3),
         *_extra_strides(dek, dev, has_extra), B, H, SQ, SK, G, *scales),
        plan, "dkdv",
    )
    _launch(
        _attention_bwd_dq_kernel, (groups_h, triton.cdiv(G * SQ, plan["dq"]["BLOCK_M"])),
        (*shared, dq, *strides, *_strides(dq, 3), B, H, SQ, SK, G, *scales),
        plan, "dq",
    )
