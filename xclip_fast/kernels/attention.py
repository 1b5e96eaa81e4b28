"""Flash-style attention over strided q/k/v with an optional extra key/value token per sequence.

    out[b, i, h] = softmax_j(scale * q[b, i, h] . [k[b, :, h]; ek[b, h]]) @ [v[b, :, h]; ev[b, h]]

Shapes (any strides, last dimension contiguous): ``q: [B, SQ, H, D]``, ``k, v: [B, SK, H, D]``,
``ek, ev: [B, H, D]``, ``out: [B, SQ, H, D]``, ``lse: [B, H, SQ]`` (fp32, fp64 for fp64 inputs).

X-CLIP uses it twice per layer: intra-frame attention (B = frames, S = l tokens, the frame's
message token as the extra key/value: the concatenation [x; msg] is never built) and cross-frame
message attention (B = videos, S = T frames, no extra token).

Two families of kernels, chosen per call by :func:`~xclip_fast.kernels.plan.pack_group`:

**Sequence kernels** (one sequence per program or per group of programs; the frame attention, and any
sequence too long to pack). Built for thousands of short sequences (l = 50..257 tokens, head dim 64),
where a kernel is bound by memory traffic and latency:

- Forward: a 1-D grid whose query-tile index varies fastest, so a sequence's query tiles run side by
  side and its K/V come from HBM once (the other tiles read them from L2). The extra token seeds the
  online-softmax state (``m = s_extra, l = 1, acc = v_extra``), so the loop over keys is the plain flash
  loop. Rows are addressed from a per-tile base pointer: no packed-form index arithmetic.
- Backward: **one launch**. Each work item is one (sequence, head) (or a slice of its key chunks when
  there are fewer sequences x heads than SMs, see below). Its prologue computes ``delta = rowsum(O dO)``
  and the extra token's dk/dv and dq contribution in one pass over the queries; then, per (key chunk,
  query chunk), five matmuls: ``S^T = K Q^T``, ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``,
  ``dQ^T += K^T dS^T``, P computed once (keys or the head dim on the rows of every product: at 16 bits
  each has at least 64 rows, as a Hopper warpgroup MMA needs, with query chunks of 16 or 32; fp32 and
  fp64 compute ``dQ += dS K``, which needs fewer registers there). dQ is accumulated
  over the key chunks in an fp32 (fp64) buffer that only this program touches, written out in the
  output dtype at the last chunk: no atomics, so the results are bit-identical from run to run.
  Programs are persistent (at most ``bwd_per_sm`` per SM, work items handed out round-robin): the dQ
  and delta buffers are per program, reused item after item, and stay in L2.
- Below the SM count of sequences x heads, each item is a slice of the key chunks; the slices' dQ
  partials go to a buffer per item and a second small launch (``_sequence_dq_sum_kernel``) sums them
  in a fixed order.

**Packed kernels** (the message attention at T <= BLOCK / 2, no extra token): G sequences share one
program, rows and columns are mapped to ``(sequence, position)`` and a block-diagonal mask keeps the
sequences apart. Non-finite values stay inside their own sequence: a masked probability of 0 times
another sequence's NaN would be NaN, so operands shared across sequences in one ``tl.dot`` are loaded
with non-finite entries zeroed, and the rows of a sequence that held one are set to NaN at the end (as
unpacked attention would give them). One corrupt clip never spoils its batch. Their backward is three
launches (``delta``, ``dkdv``, ``dq``; one jit function compiled twice for the last two, under the
names ``_packed_bwd_kernel_dkdv`` and ``_packed_bwd_kernel_dq``), each runnable alone (:func:`attention_bwd`'s
``passes``), which the tuner and the lab time.

Common to both: scores are kept in base 2 (``scale * log2(e)`` folded in) and ``lse`` is stored in
base 2; accumulators are fp32 (fp64 for fp64 inputs); the softmax scale travels as two fp32 numbers
(hi + lo) because Triton passes Python floats as fp32, which would cost fp64 inputs precision. The
kernels cast both to fp32 on entry, so a caller that passes them as fp64 (Inductor may) gets the same
arithmetic.

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

from . import acc_dtype, cdiv, wrap_triton
from .plan import LOG2E, pack_group, plan_for, sm_count
from .tiles import (
    bad_rows,
    col_ptrs,
    dim_mask,
    extra_grads,
    is_finite,
    load_extra,
    online_softmax,
    positions,
    row_ptrs,
    scaled,
)

__all__ = ["attention_fwd", "attention_bwd", "launch_name", "kernels_of", "sequence_bwd_grid", "MAX_HEAD_DIM",
           "PACKED_BWD_PASSES"]

MAX_HEAD_DIM = 128  # register tiles of up to 128 columns (ptxas reports, xclip_fast/kernels/plan.py)
PACKED_BWD_PASSES = ("delta", "dkdv", "dq")  # the packed backward's launches, in order


# ----------------------------------------------------------------------------------------------
# sequence kernels: forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_fwd_kernel(
    q, k, v, ek, ev, o, lse,  # q/o: [B, SQ, H, D], k/v: [B, SK, H, D], ek/ev: [B, H, D], lse: [B, H, SQ]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_lse_b, stride_lse_h,
    H, SQ, SK, M_TILES,  # M_TILES: query tiles per sequence
    scale_hi, scale_lo,  # scale * log2(e) = scale_hi + scale_lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    i_m = pid % M_TILES  # fastest: the query tiles of one sequence run side by side and share its K/V in L2
    i_bh = pid // M_TILES
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    start_m = i_m * BLOCK_M
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = dim_mask(o_d, HEAD_DIM, BLOCK_D)
    m_m = start_m + o_m < SQ

    p_q = q + i_b * stride_q_b + i_h * stride_q_h + start_m.to(tl.int64) * stride_q_s
    b_q = tl.load(p_q + o_m[:, None] * stride_q_s + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)

    if HAS_EXTRA:
        # seed the online softmax with the extra token
        b_ek, b_ev = load_extra(ek, ev, i_b, i_h, stride_ek_b, stride_ek_h, stride_ev_b, stride_ev_h, o_d, m_d, ACC)
        b_m = scaled(tl.sum(b_q.to(ACC) * b_ek[None, :], axis=1), scale_hi, scale_lo, ACC)
        b_l = tl.full([BLOCK_M], 1.0, ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC) + b_ev[None, :]
    else:
        b_m = tl.full([BLOCK_M], float("-inf"), ACC)
        b_l = tl.zeros([BLOCK_M], ACC)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    # tile pointers advanced by one key tile per iteration (no int32 product grows with the sequence)
    p_kt = k + i_b * stride_k_b + i_h * stride_k_h + o_n[None, :] * stride_k_s + o_d[:, None]
    p_v = v + i_b * stride_v_b + i_h * stride_v_h + o_n[:, None] * stride_v_s + o_d[None, :]
    for start_n in range(0, SK, BLOCK_N):
        m_n = start_n + o_n < SK
        b_kt = tl.load(p_kt, mask=m_d[:, None] & m_n[None, :], other=0.0)
        # [BM, BD] @ [BD, BN]
        b_s = scaled(tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC), scale_hi, scale_lo, ACC)
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_p, b_alpha, b_m, b_l = online_softmax(b_s, b_m, b_l)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # [BM, BN] @ [BN, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=ACC)
        p_kt += BLOCK_N * stride_k_s
        p_v += BLOCK_N * stride_v_s

    b_l_safe = tl.where(m_m, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    p_o = o + i_b * stride_o_b + i_h * stride_o_h + start_m.to(tl.int64) * stride_o_s
    tl.store(p_o + o_m[:, None] * stride_o_s + o_d[None, :], b_o.to(o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])
    p_lse = lse + i_b * stride_lse_b + i_h * stride_lse_h + start_m + o_m
    tl.store(p_lse, b_m + tl.log2(b_l_safe), mask=m_m)


# ----------------------------------------------------------------------------------------------
# sequence kernels: backward (one launch; a second, small one only when key chunks are split)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_bwd_kernel(
    q, k, v, ek, ev, o, do, lse,  # as the forward; o/do: [B, SQ, H, D]
    dq, dk, dv, dek, dev,  # dq: [B, SQ, H, D], dk/dv: [B, SK, H, D], dek/dev: [B, H, D]
    work_dq, work_delta,  # ACC scratch: dq [programs or items, SQP x BLOCK_D] (see DQ_T), delta [programs, SQP]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_ek_b, stride_ek_h,
    stride_ev_b, stride_ev_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_lse_b, stride_lse_h,
    stride_dq_b, stride_dq_s, stride_dq_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    stride_dek_b, stride_dek_h,
    stride_dev_b, stride_dev_h,
    H, SQ, SK, ITEMS, SPLIT, SPLIT_KEYS, SQP,  # items = B * H * SPLIT; SPLIT_KEYS: keys per slice; SQP: padded SQ
    scale_hi, scale_lo, dscale_hi, dscale_lo,  # scale * log2(e) and scale, each as fp32 hi + lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PARTIAL: tl.constexpr,  # True: SPLIT > 1, each item leaves its dq partial in work_dq for the sum kernel
    DQ_T: tl.constexpr,  # True: dq as K^T dS^T (16-bit: a wgmma's 64 rows), scratch [BLOCK_D, SQP]; else [SQP, BLOCK_D]
):
    """One launch of persistent programs, each taking items ``pid, pid + programs, ...``. The scratch
    buffers are written and read back by the same program; a barrier separates the two."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = dim_mask(o_d, HEAD_DIM, BLOCK_D)
    p_delta0 = work_delta + pid.to(tl.int64) * SQP + o_m
    # the dq scratch's strides per query row and per head-dim column (padded: no mask)
    if DQ_T:
        w_m = 1
        w_d = SQP
    else:
        w_m = BLOCK_D
        w_d = 1
    o_w = o_m[:, None] * w_m + o_d[None, :] * w_d  # a [BM, BD] tile

    for item in range(pid, ITEMS, programs):
        i_s = item % SPLIT  # the slice of key chunks
        i_bh = item // SPLIT
        i_b = tl.cast(i_bh // H, tl.int64)
        i_h = i_bh % H
        if PARTIAL:
            p_w0 = work_dq + tl.cast(item, tl.int64) * SQP * BLOCK_D + o_w
        else:
            p_w0 = work_dq + pid.to(tl.int64) * SQP * BLOCK_D + o_w
        base_q = q + i_b * stride_q_b + i_h * stride_q_h
        base_do = do + i_b * stride_do_b + i_h * stride_do_h
        base_lse = lse + i_b * stride_lse_b + i_h * stride_lse_h

        # prologue, one pass over the queries: delta = rowsum(O * dO); the extra token's probability,
        # its dk/dv, and its term of dq (dS_e ek), which seeds the dq accumulator (slice 0 only)
        first = i_s == 0
        if HAS_EXTRA:
            b_ek, b_ev = load_extra(ek, ev, i_b, i_h, stride_ek_b, stride_ek_h, stride_ev_b, stride_ev_h, o_d, m_d,
                                     ACC)
            b_dek = tl.zeros([BLOCK_D], ACC)
            b_dev = tl.zeros([BLOCK_D], ACC)
        p_q = base_q + o_m[:, None] * stride_q_s + o_d[None, :]
        p_o = o + i_b * stride_o_b + i_h * stride_o_h + o_m[:, None] * stride_o_s + o_d[None, :]
        p_do = base_do + o_m[:, None] * stride_do_s + o_d[None, :]
        p_delta = p_delta0
        p_w = p_w0
        for start_m in range(0, SQ, BLOCK_M):
            m_m = start_m + o_m < SQ
            m_md = m_m[:, None] & m_d[None, :]
            b_do = tl.load(p_do, mask=m_md, other=0.0).to(ACC)
            b_delta = tl.sum(tl.load(p_o, mask=m_md, other=0.0).to(ACC) * b_do, axis=1)
            tl.store(p_delta, b_delta)
            if HAS_EXTRA:
                # q and dO as rows, never the operands of the matmuls below (on sm_90 with fp16, an
                # elementwise use of tl.trans of a dot's q operand once gave a wrong dk: H200, triton 3.6)
                b_q = tl.load(p_q, mask=m_md, other=0.0).to(ACC)
                b_lse = tl.load(base_lse + start_m + o_m, mask=m_m, other=0.0)
                b_pe, b_dse = extra_grads(b_q, b_do, b_lse, b_delta, b_ek, b_ev, m_m, scale_hi, scale_lo, ACC)
                b_dev += tl.sum(b_pe[:, None] * b_do, axis=0)
                b_dek += tl.sum(b_dse[:, None] * b_q, axis=0)
                b_dq0 = tl.where(first, b_dse[:, None] * b_ek[None, :], 0.0)
            else:
                b_dq0 = tl.zeros([BLOCK_M, BLOCK_D], ACC)
            tl.store(p_w, b_dq0)
            p_q += BLOCK_M * stride_q_s
            p_o += BLOCK_M * stride_o_s
            p_do += BLOCK_M * stride_do_s
            p_delta += BLOCK_M
            p_w += BLOCK_M * w_m
        if HAS_EXTRA:
            if first:
                b_dek = scaled(b_dek, dscale_hi, dscale_lo, ACC)
                tl.store(dek + i_b * stride_dek_b + i_h * stride_dek_h + o_d, b_dek.to(dek.dtype.element_ty),
                         mask=m_d)
                tl.store(dev + i_b * stride_dev_b + i_h * stride_dev_h + o_d, b_dev.to(dev.dtype.element_ty),
                         mask=m_d)
        tl.debug_barrier()  # the scratch written above is read below by other threads of this program

        # main loop: per key chunk of this slice, every query chunk; five matmuls per pair
        lo = i_s * SPLIT_KEYS
        hi = tl.minimum(SK, lo + SPLIT_KEYS)
        lo64 = tl.cast(lo, tl.int64)
        p_k = k + i_b * stride_k_b + i_h * stride_k_h + lo64 * stride_k_s + o_n[:, None] * stride_k_s + o_d[None, :]
        p_v = v + i_b * stride_v_b + i_h * stride_v_h + lo64 * stride_v_s + o_n[:, None] * stride_v_s + o_d[None, :]
        p_dk = dk + i_b * stride_dk_b + i_h * stride_dk_h + lo64 * stride_dk_s + o_n[:, None] * stride_dk_s \
            + o_d[None, :]
        p_dv = dv + i_b * stride_dv_b + i_h * stride_dv_h + lo64 * stride_dv_s + o_n[:, None] * stride_dv_s \
            + o_d[None, :]
        for start_n in range(lo, hi, BLOCK_N):
            m_n = start_n + o_n < SK
            m_nd = m_n[:, None] & m_d[None, :]
            b_k = tl.load(p_k, mask=m_nd, other=0.0)
            b_v = tl.load(p_v, mask=m_nd, other=0.0)
            b_dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            b_dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            last = start_n + BLOCK_N >= hi  # the slice's last chunk: dq is complete (unless PARTIAL)
            p_q = base_q + o_m[:, None] * stride_q_s + o_d[None, :]
            p_do = base_do + o_m[:, None] * stride_do_s + o_d[None, :]
            p_dq = dq + i_b * stride_dq_b + i_h * stride_dq_h + o_m[:, None] * stride_dq_s + o_d[None, :]
            p_delta = p_delta0
            p_w = p_w0
            for start_m in range(0, SQ, BLOCK_M):
                m_m = start_m + o_m < SQ
                m_md = m_m[:, None] & m_d[None, :]
                b_q = tl.load(p_q, mask=m_md, other=0.0)
                b_do = tl.load(p_do, mask=m_md, other=0.0)
                b_lse = tl.load(base_lse + start_m + o_m, mask=m_m, other=0.0)
                b_delta = tl.load(p_delta)
                m_s = m_n[:, None] & m_m[None, :]
                # [BN, BD] @ [BD, BM]: scores transposed, keys on rows
                b_st = scaled(tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION, out_dtype=ACC), scale_hi,
                              scale_lo, ACC)
                b_pt = tl.where(m_s, tl.exp2(b_st - b_lse[None, :]), 0.0)
                # [BN, BM] @ [BM, BD]
                b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION, out_dtype=ACC)
                # [BN, BD] @ [BD, BM]
                b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION, out_dtype=ACC)
                b_dst = tl.where(m_s, b_pt * (b_dpt - b_delta[None, :]), 0.0)
                # [BN, BM] @ [BM, BD]
                b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION, out_dtype=ACC)
                # added to the query chunk's accumulator
                if DQ_T:
                    # [BD, BN] @ [BN, BM]: dq transposed, so that the product's rows are the head dim (a
                    # warpgroup MMA needs 64 rows; BLOCK_M may be 16 or 32)
                    p_wt = tl.trans(p_w)
                    b_dqt = tl.load(p_wt) + tl.dot(tl.trans(b_k), b_dst.to(b_k.dtype), input_precision=PRECISION,
                                                   out_dtype=ACC)
                    tl.store(p_wt, b_dqt)
                    if not PARTIAL:
                        if last:
                            b_dqt = scaled(b_dqt, dscale_hi, dscale_lo, ACC)
                            tl.store(tl.trans(p_dq), b_dqt.to(dq.dtype.element_ty), mask=tl.trans(m_md))
                else:
                    # [BM, BN] @ [BN, BD] (fp32 and fp64 on the FMA and DMMA units: rows first costs fewer
                    # registers there)
                    b_dq = tl.load(p_w) + tl.dot(tl.trans(b_dst).to(b_k.dtype), b_k, input_precision=PRECISION,
                                                 out_dtype=ACC)
                    tl.store(p_w, b_dq)
                    if not PARTIAL:
                        if last:
                            tl.store(p_dq, scaled(b_dq, dscale_hi, dscale_lo, ACC).to(dq.dtype.element_ty),
                                     mask=m_md)
                p_q += BLOCK_M * stride_q_s
                p_do += BLOCK_M * stride_do_s
                p_dq += BLOCK_M * stride_dq_s
                p_delta += BLOCK_M
                p_w += BLOCK_M * w_m
            # d(score)/dk = natural scale * q: applied once here (dscale_hi + dscale_lo = scale)
            tl.store(p_dk, scaled(b_dk, dscale_hi, dscale_lo, ACC).to(dk.dtype.element_ty), mask=m_nd)
            tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_nd)
            p_k += BLOCK_N * stride_k_s
            p_v += BLOCK_N * stride_v_s
            p_dk += BLOCK_N * stride_dk_s
            p_dv += BLOCK_N * stride_dv_s
            tl.debug_barrier()  # this chunk's dq accumulators are read by the next chunk (or item)


@triton.jit
def _sequence_dq_sum_kernel(
    work_dq, dq,  # work_dq: [B * H * SPLIT, SQP x BLOCK_D] partials (laid out as DQ_T says); dq: [B, SQ, H, D]
    stride_dq_b, stride_dq_s, stride_dq_h,
    H, SQ, SPLIT, SQP,
    dscale_hi, dscale_lo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DQ_T: tl.constexpr,
):
    """dq of one query tile: the key slices' partials summed in slice order (deterministic)."""
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    if DQ_T:
        o_w = o_m[:, None] + o_d[None, :] * SQP
    else:
        o_w = o_m[:, None] * BLOCK_D + o_d[None, :]
    p_w = work_dq + (i_bh * SPLIT).to(tl.int64) * SQP * BLOCK_D + o_w
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for _ in range(0, SPLIT):
        b_dq += tl.load(p_w)
        p_w += SQP * BLOCK_D
    p_dq = dq + i_b * stride_dq_b + i_h * stride_dq_h + o_m[:, None].to(tl.int64) * stride_dq_s + o_d[None, :]
    m_md = (o_m < SQ)[:, None] & dim_mask(o_d, HEAD_DIM, BLOCK_D)[None, :]
    tl.store(p_dq, scaled(b_dq, dscale_hi, dscale_lo, ACC).to(dq.dtype.element_ty), mask=m_md)


# ----------------------------------------------------------------------------------------------
# packed kernels: G short sequences per program, no extra token (the message attention at small T)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _packed_fwd_kernel(
    q, k, v, o, lse,  # q/o: [B, SQ, H, D], k/v: [B, SK, H, D], lse: [B, H, SQ]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_o_b, stride_o_s, stride_o_h,
    stride_lse_b, stride_lse_h,
    B, H, SQ, SK, G,  # G: sequences packed in one program
    scale_hi, scale_lo,  # scale * log2(e) = scale_hi + scale_lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    i_gh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G

    # virtual rows r -> (sequence g, position i)
    o_rg, o_rb, o_ri, m_r = positions(i_m * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
    o_d = tl.arange(0, BLOCK_D)
    m_d = dim_mask(o_d, HEAD_DIM, BLOCK_D)

    b_q = tl.load(row_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d),
                  mask=m_r[:, None] & m_d[None, :], other=0.0)
    b_m = tl.full([BLOCK_M], float("-inf"), ACC)
    b_l = tl.zeros([BLOCK_M], ACC)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    b_bad = tl.zeros([BLOCK_M], tl.int32)  # rows whose own sequence holds a non-finite value

    for start_n in range(0, G * SK, BLOCK_N):
        o_cg, o_cb, o_cj, m_c = positions(start_n, BLOCK_N, SK, G, i_b0, B)

        b_kt = tl.load(col_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d),
                       mask=m_d[:, None] & m_c[None, :], other=0.0)
        # [BM, BD] @ [BD, BN]
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC)
        b_s = scaled(b_s, scale_hi, scale_lo, ACC)
        m_s = m_c[None, :] & (o_rg[:, None] == o_cg[None, :])
        b_s = tl.where(m_s, b_s, float("-inf"))

        b_p, b_alpha, b_m, b_l = online_softmax(b_s, b_m, b_l)

        b_v = tl.load(row_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d),
                      mask=m_c[:, None] & m_d[None, :], other=0.0)
        # P @ V sums over every sequence of the tile: keep another sequence's NaN out of it
        b_bad = tl.maximum(b_bad, tl.max(tl.where(m_s & (bad_rows(b_v, 1)[None, :] > 0), 1, 0), axis=1))
        b_v = tl.where(is_finite(b_v), b_v, 0.0)
        # [BM, BN] @ [BN, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=ACC)

    b_l_safe = tl.where(m_r, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    b_o = tl.where(b_bad[:, None] > 0, float("nan"), b_o)
    p_o = row_ptrs(o, o_rb, o_ri, i_h, stride_o_b, stride_o_s, stride_o_h, o_d)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    p_lse = lse + o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
    tl.store(p_lse, b_m + tl.log2(b_l_safe), mask=m_r)


@triton.jit
def _packed_bwd_delta_kernel(
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
    m_id = m_i[:, None] & dim_mask(o_d, HEAD_DIM, BLOCK_D)[None, :]
    p_o = o + i_b * stride_o_b + o_i64[:, None] * stride_o_s + i_h * stride_o_h + o_d[None, :]
    p_do = do + i_b * stride_do_b + o_i64[:, None] * stride_do_s + i_h * stride_do_h + o_d[None, :]
    b_o = tl.load(p_o, mask=m_id, other=0.0).to(ACC)
    b_do = tl.load(p_do, mask=m_id, other=0.0).to(ACC)
    p_delta = delta + i_b * stride_delta_b + i_h * stride_delta_h + o_i64
    tl.store(p_delta, tl.sum(b_o * b_do, axis=1), mask=m_i)


def _packed_bwd_name(spec) -> str:
    """The name each packed backward pass compiles to (``triton.jit(repr=...)``: what profilers, Nsight
    and ``cuobjdump`` show): ``spec.constants`` holds the launch's compile-time arguments by name. Both
    names contain the function's: PyTorch finds a user kernel in its Triton IR by that name to learn
    which buffers it writes, and without it ``torch.compile`` copies every input of the launch first."""
    dkdv = spec.constants.get("DKDV")
    return "_packed_bwd_kernel_dkdv" if bool(getattr(dkdv, "value", dkdv)) else "_packed_bwd_kernel_dq"


@triton.jit(repr=_packed_bwd_name)
def _packed_bwd_kernel(
    q, k, v, do, lse, delta,  # as forward; do: [B, SQ, H, D]; lse/delta: [B, H, SQ]
    dq, dk, dv,  # dq: [B, SQ, H, D], dk/dv: [B, SK, H, D]
    stride_q_b, stride_q_s, stride_q_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_do_b, stride_do_s, stride_do_h,
    stride_lse_b, stride_lse_h,  # delta shares lse's layout (made by the launcher)
    stride_dq_b, stride_dq_s, stride_dq_h,
    stride_dk_b, stride_dk_s, stride_dk_h,
    stride_dv_b, stride_dv_s, stride_dv_h,
    B, H, SQ, SK, G,
    scale_hi, scale_lo, dscale_hi, dscale_lo,  # scale * log2(e) and scale, each as fp32 hi + lo
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    DKDV: tl.constexpr,  # True: the dk/dv pass (one program per key tile); False: the dq pass (per query tile)
):
    """The two packed backward passes share this signature; ``DKDV`` selects one at compile time, so
    each launch compiles to the code of its own pass. Neither pass uses atomics."""
    i_gh = tl.program_id(0)
    i_t = tl.program_id(1)  # the key tile (dk/dv pass) or the query tile (dq pass) of this program
    i_h = i_gh % H
    i_b0 = (i_gh // H).to(tl.int64) * G
    o_d = tl.arange(0, BLOCK_D)
    m_d = dim_mask(o_d, HEAD_DIM, BLOCK_D)

    if DKDV:
        o_cg, o_cb, o_cj, m_c = positions(i_t * BLOCK_N, BLOCK_N, SK, G, i_b0, B)
        m_cd = m_c[:, None] & m_d[None, :]
        b_k = tl.load(row_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d), mask=m_cd, other=0.0)
        b_v = tl.load(row_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d), mask=m_cd, other=0.0)
        b_dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        b_dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        # keys whose own sequence holds a non-finite value that reaches their dk (q, do, lse, delta)
        # or their dv (q, do, lse: dv = P^T dO does not involve delta)
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

            m_s = m_c[:, None] & m_r[None, :] & (o_cg[:, None] == o_rg[None, :])
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
        b_dk = tl.where(b_bad_k[:, None] > 0, float("nan"), b_dk)
        b_dv = tl.where(b_bad_v[:, None] > 0, float("nan"), b_dv)
        p_dk = row_ptrs(dk, o_cb, o_cj, i_h, stride_dk_b, stride_dk_s, stride_dk_h, o_d)
        p_dv = row_ptrs(dv, o_cb, o_cj, i_h, stride_dv_b, stride_dv_s, stride_dv_h, o_d)
        tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_cd)
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_cd)
    else:
        o_rg, o_rb, o_ri, m_r = positions(i_t * BLOCK_M, BLOCK_M, SQ, G, i_b0, B)
        m_rd = m_r[:, None] & m_d[None, :]
        b_q = tl.load(row_ptrs(q, o_rb, o_ri, i_h, stride_q_b, stride_q_s, stride_q_h, o_d), mask=m_rd, other=0.0)
        b_do = tl.load(row_ptrs(do, o_rb, o_ri, i_h, stride_do_b, stride_do_s, stride_do_h, o_d), mask=m_rd, other=0.0)
        o_stat = o_rb * stride_lse_b + i_h * stride_lse_h + o_ri
        b_lse = tl.load(lse + o_stat, mask=m_r, other=0.0)
        b_delta = tl.load(delta + o_stat, mask=m_r, other=0.0)
        b_dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        b_bad = tl.zeros([BLOCK_M], tl.int32)  # rows whose own sequence holds a non-finite key

        for start_n in range(0, G * SK, BLOCK_N):
            o_cg, o_cb, o_cj, m_c = positions(start_n, BLOCK_N, SK, G, i_b0, B)
            m_dc = m_d[:, None] & m_c[None, :]
            b_kt = tl.load(col_ptrs(k, o_cb, o_cj, i_h, stride_k_b, stride_k_s, stride_k_h, o_d), mask=m_dc, other=0.0)
            b_vt = tl.load(col_ptrs(v, o_cb, o_cj, i_h, stride_v_b, stride_v_s, stride_v_h, o_d), mask=m_dc, other=0.0)
            m_s = m_r[:, None] & m_c[None, :] & (o_rg[:, None] == o_cg[None, :])
            # [BM, BD] @ [BD, BN]
            b_s = scaled(tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=ACC), scale_hi, scale_lo, ACC)
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
            # [BM, BD] @ [BD, BN]
            b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION, out_dtype=ACC)
            # a row's own non-finite values reach its dq through b_ds; other sequences' stay out
            b_ds = tl.where(m_s, b_p * (b_dp - b_delta[:, None]), 0.0)
            # dS @ K sums over the keys of every sequence: zero the non-finite keys, flag their rows
            b_bad = tl.maximum(b_bad, tl.max(tl.where(m_s & (bad_rows(b_kt, 0)[None, :] > 0), 1, 0), axis=1))
            b_kt = tl.where(is_finite(b_kt), b_kt, 0.0)
            # [BM, BN] @ [BN, BD]
            b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION, out_dtype=ACC)

        b_dq = scaled(b_dq, dscale_hi, dscale_lo, ACC)
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


def kernels_of(plan, sq, sk) -> tuple[str, ...]:
    """The launches of one forward and backward of a problem with ``sq`` queries and ``sk`` keys per
    sequence under ``plan``, as the bench and the tuner name them (the tiles of :class:`LaunchPlan` of the
    same names): ``("fwd", "bwd")`` for the sequence kernels (the backward one launch, or two when key
    chunks are split, timed together), ``("packed_fwd", "packed_delta", "packed_dkdv", "packed_dq")`` for
    the packed ones."""
    if pack_group(plan, sq, sk) > 1:
        return ("packed_fwd", *(f"packed_{p}" for p in PACKED_BWD_PASSES))
    return ("fwd", "bwd")


def sequence_bwd_grid(plan, B, H, SK, sms):
    """``(split, keys per slice, items, programs)`` of the sequence backward for ``B x H`` sequences of
    ``SK`` keys on a GPU of ``sms`` SMs: with fewer sequences x heads than SMs the key chunks are split
    into slices (each slice a work item; a second launch sums their dq), and at most ``plan.bwd_per_sm``
    persistent programs per SM take the items round-robin."""
    chunk = plan.bwd.block_n
    chunks = cdiv(SK, chunk)
    bh = B * H
    split = 1
    if bh < sms and chunks > 1:
        per = cdiv(chunks, min(chunks, cdiv(sms, bh)))
        split = cdiv(chunks, per)  # every slice holds at least one chunk
    else:
        per = chunks
    items = bh * split
    return split, per * chunk, items, min(items, sms * plan.bwd_per_sm)


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
    if G > 1:
        t = plan.packed_fwd
        wrap_triton(_packed_fwd_kernel)[(cdiv(B, G) * H, cdiv(G * SQ, t.block_m))](
            q, k, v, o, lse,
            *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_strides(o, 3), lse.stride(0), lse.stride(1),
            B, H, SQ, SK, G, *_split(scale * LOG2E),
            **plan.constexprs(), BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
        )
        return
    t = plan.fwd
    m_tiles = cdiv(SQ, t.block_m)
    if m_tiles * B * H == 0:
        return
    if not has_extra:
        ek = ev = q  # never read (HAS_EXTRA is False); any valid pointer will do
    wrap_triton(_sequence_fwd_kernel)[(m_tiles * B * H,)](
        q, k, v, ek, ev, o, lse,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(o, 3), lse.stride(0), lse.stride(1),
        H, SQ, SK, m_tiles, *_split(scale * LOG2E),
        **plan.constexprs(), HAS_EXTRA=has_extra, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )


def attention_bwd(q, k, v, ek, ev, o, lse, do, dq, dk, dv, dek, dev, scale: float,
                  allow_tf32: bool = False, plan=None, passes=None, delta=None, sms=None) -> None:
    """Backward launcher: writes ``dq, dk, dv`` (and ``dek, dev`` with the extra token).

    Every output is fully written (no accumulation into existing values), deterministically.
    ``plan`` as in :func:`attention_fwd`. The sequence kernels' backward is one launch (two when the key
    chunks are split, see :func:`sequence_bwd_grid`; ``sms``: the SM count to plan for instead of the
    device's). The packed kernels' backward is three: ``passes`` picks which of :data:`PACKED_BWD_PASSES`
    run, in that order (all by default; the tuner and the lab time each one alone), and ``delta``
    (``lse``'s shape and strides) is the buffer of the ``delta`` pass, which the other two read (made
    here when None; it must then hold that pass's result if the pass is not run).
    """
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    has_extra = ek is not None
    plan = plan or plan_for(q, SK, has_extra, allow_tf32)
    G = pack_group(plan, SQ, SK)
    if G > 1:
        _packed_bwd(q, k, v, o, lse, do, dq, dk, dv, scale, plan, G, passes or PACKED_BWD_PASSES, delta)
        return
    assert passes is None or tuple(passes) == ("bwd",), f"the sequence backward is one launch, not {passes}"
    assert SK > 0, "dq is written at the last key chunk: the input checks refuse sequences without keys"
    split, split_keys, items, programs = sequence_bwd_grid(plan, B, H, SK, sm_count(q) if sms is None else sms)
    if items == 0:
        return
    if not has_extra:
        ek = ev = dek = dev = q  # never touched
    t = plan.bwd
    sqp = cdiv(SQ, t.block_m) * t.block_m
    acc = acc_dtype(q.dtype)
    work_dq = torch.empty(((items if split > 1 else programs) * sqp * plan.block_d,), dtype=acc, device=q.device)
    work_delta = torch.empty((programs * sqp,), dtype=acc, device=q.device)
    consts = plan.constexprs()
    wrap_triton(_sequence_bwd_kernel)[(programs,)](
        q, k, v, ek, ev, o, do, lse, dq, dk, dv, dek, dev, work_dq, work_delta,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_extra_strides(ek, ev, has_extra),
        *_strides(o, 3), *_strides(do, 3), lse.stride(0), lse.stride(1),
        *_strides(dq, 3), *_strides(dk, 3), *_strides(dv, 3), *_extra_strides(dek, dev, has_extra),
        H, SQ, SK, items, split, split_keys, sqp, *_split(scale * LOG2E), *_split(scale),
        **consts, HAS_EXTRA=has_extra, PARTIAL=split > 1, DQ_T=plan.dq_t, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if split > 1 and SQ > 0:
        wrap_triton(_sequence_dq_sum_kernel)[(B * H, cdiv(SQ, t.block_m))](
            work_dq, dq, *_strides(dq, 3), H, SQ, split, sqp, *_split(scale),
            HEAD_DIM=consts["HEAD_DIM"], BLOCK_M=t.block_m, BLOCK_D=plan.block_d, ACC=plan.acc, DQ_T=plan.dq_t,
            num_warps=4,
        )


def _packed_bwd(q, k, v, o, lse, do, dq, dk, dv, scale, plan, G, passes, delta):
    assert not set(passes) - set(PACKED_BWD_PASSES), f"unknown backward passes {passes}"
    B, SQ, H, D = q.shape
    SK = k.shape[1]
    if delta is None:
        assert "delta" in passes, "the dk/dv and dq passes read delta: run its pass or pass its buffer"
        delta = torch.empty_like(lse)
    assert delta.stride() == lse.stride()
    consts = plan.constexprs()
    if "delta" in passes:
        pre = plan.packed_delta
        wrap_triton(_packed_bwd_delta_kernel)[(B * H, cdiv(SQ, pre.block_m))](
            o, do, delta, *_strides(o, 3), *_strides(do, 3), delta.stride(0), delta.stride(1), H, SQ,
            HEAD_DIM=plan.head_dim, BLOCK_M=pre.block_m, BLOCK_D=plan.block_d, ACC=plan.acc,
            num_warps=pre.num_warps,
        )
    args = (
        q, k, v, do, lse, delta, dq, dk, dv,
        *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *_strides(do, 3), lse.stride(0), lse.stride(1),
        *_strides(dq, 3), *_strides(dk, 3), *_strides(dv, 3),
        B, H, SQ, SK, G, *_split(scale * LOG2E), *_split(scale),
    )
    groups_h = cdiv(B, G) * H
    for name, dkdv, t, tiles in (("dkdv", True, plan.packed_dkdv, cdiv(G * SK, plan.packed_dkdv.block_n)),
                                 ("dq", False, plan.packed_dq, cdiv(G * SQ, plan.packed_dq.block_m))):
        if name in passes:
            wrap_triton(_packed_bwd_kernel)[(groups_h, tiles)](
                *args, **consts, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DKDV=dkdv, num_warps=t.num_warps,
                num_stages=t.num_stages,
            )


def launch_name(kernel, constexprs: dict) -> str:
    """The name a launch of the jit function ``kernel`` with the compile-time arguments ``constexprs``
    compiles to, as profilers report it (the two packed backward passes have names of their own)."""
    if kernel is _packed_bwd_kernel:
        return _packed_bwd_name(SimpleNamespace(constants=constexprs))
    return getattr(kernel, "fn", kernel).__name__
