"""Tile helpers of the attention kernels (``@triton.jit`` functions inlined into them): the softmax
scale in two parts, the head-dim mask, one step of the online softmax, packed-tile positions, pointer
tiles, the extra token's load, non-finite rows."""

import triton
import triton.language as tl

__all__ = ["scaled", "dim_mask", "online_softmax", "positions", "row_ptrs", "col_ptrs", "load_extra", "extra_grads",
           "is_finite", "bad_rows"]


@triton.jit
def scaled(b, hi, lo, ACC: tl.constexpr):
    """``b * (hi + lo)``: the scale travels as two fp32 numbers so fp64 inputs keep fp64 precision.
    Both are cast to fp32 first, so fp64 scalar arguments change nothing (and cannot promote an fp32
    accumulator to fp64)."""
    hi = tl.cast(hi, tl.float32)
    lo = tl.cast(lo, tl.float32)
    if ACC == tl.float64:
        b = b * hi.to(tl.float64) + b * lo.to(tl.float64)
    else:
        b = b * hi
    return b


@triton.jit
def dim_mask(o_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which of the ``BLOCK_D`` columns ``o_d`` are inside the head dim: a constant all-true mask when the
    head dim fills the tile, so that the compiler drops it and keeps the loads vectorised."""
    m = o_d < HEAD_DIM
    if HEAD_DIM == BLOCK_D:
        m = tl.full([BLOCK_D], 1, tl.int1)
    return m


@triton.jit
def online_softmax(b_s, b_m, b_l):
    """One key tile of the online softmax: scores ``b_s`` ([rows, cols], base 2, masked columns -inf), the
    running row maximum ``b_m`` and sum ``b_l`` -> (probabilities, the factor that rescales what was
    accumulated so far, the new maximum, the new sum)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    # a row that has seen no valid key yet keeps m = -inf; shift by 0 instead (no inf - inf)
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    return b_p, b_alpha, b_m_new, b_l * b_alpha + tl.sum(b_p, axis=1)


@triton.jit
def positions(start, SIZE: tl.constexpr, S, G, i_b0, B):
    """Virtual indices ``start + [0, SIZE)`` of a group of G sequences of length S -> (sequence in
    the group, batch index, position as int64, valid). With G == 1 this is a plain tile."""
    o = start + tl.arange(0, SIZE)
    o_g = o // S
    o_b = i_b0 + o_g
    o_i = (o - o_g * S).to(tl.int64)
    return o_g, o_b, o_i, (o < G * S) & (o_b < B)


@triton.jit
def row_ptrs(base, o_b, o_i, i_h, stride_b, stride_s, stride_h, o_d):
    """Pointers to a ``[rows, BD]`` tile of a ``[B, S, H, D]`` tensor: rows (batch o_b, position o_i)
    of head i_h."""
    return base + o_b[:, None] * stride_b + o_i[:, None] * stride_s + i_h * stride_h + o_d[None, :]


@triton.jit
def col_ptrs(base, o_b, o_i, i_h, stride_b, stride_s, stride_h, o_d):
    """The same tile transposed: pointers of shape ``[BD, cols]``."""
    return base + o_b[None, :] * stride_b + o_i[None, :] * stride_s + i_h * stride_h + o_d[:, None]


@triton.jit
def load_extra(ek, ev, i_b, i_h, stride_ek_b, stride_ek_h, stride_ev_b, stride_ev_h, o_d, m_d, ACC: tl.constexpr):
    """The extra key and value of sequence ``i_b``, head ``i_h``: two ``[BD]`` vectors in ACC."""
    b_ek = tl.load(ek + i_b * stride_ek_b + i_h * stride_ek_h + o_d, mask=m_d, other=0.0).to(ACC)
    b_ev = tl.load(ev + i_b * stride_ev_b + i_h * stride_ev_h + o_d, mask=m_d, other=0.0).to(ACC)
    return b_ek, b_ev


@triton.jit
def extra_grads(b_q, b_do, b_lse, b_delta, b_ek, b_ev, m_r, scale_hi, scale_lo, ACC: tl.constexpr):
    """For query rows ``b_q``/``b_do`` (``[rows, BD]`` in ACC, rows valid where ``m_r``): the extra
    token's probability ``p_e`` and the gradient of its score ``dS_e = p_e * (dO . v_e - delta)``."""
    b_se = scaled(tl.sum(b_q * b_ek[None, :], axis=1), scale_hi, scale_lo, ACC)
    b_pe = tl.where(m_r, tl.exp2(b_se - b_lse), 0.0)
    return b_pe, b_pe * (tl.sum(b_do * b_ev[None, :], axis=1) - b_delta)


@triton.jit
def is_finite(b):
    return (b == b) & (tl.abs(b) < float("inf"))


@triton.jit
def bad_rows(b, AXIS: tl.constexpr):
    """1 where a row (AXIS=1) or column (AXIS=0) of ``b`` holds a NaN or an infinity, else 0."""
    return tl.max(tl.where(is_finite(b), 0, 1), axis=AXIS)
