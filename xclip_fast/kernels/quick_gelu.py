"""QuickGELU, ``y = x * sigmoid(1.702 x)``, forward and backward as single elementwise passes.

CLIP's MLP activation. Unfused, PyTorch runs three passes (scale, sigmoid, multiply) and autograd
keeps the sigmoid output alive for backward; these kernels read ``x`` once and write once, compute
in fp32 (fp64 for fp64 inputs), and the backward recomputes the sigmoid from ``x``, so only the
activation's input needs to be saved. ``y`` may alias ``x`` (in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import acc_dtype, cdiv, tl_dtype, wrap_triton
from .plan import quick_gelu_config

__all__ = ["quick_gelu_fwd", "quick_gelu_bwd"]


@triton.jit
def _quick_gelu_fwd_kernel(
    x, y,  # [N] contiguous, y may alias x
    N,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < N
    b_x = tl.load(x + o_i, mask=m_i, other=0.0).to(ACC)
    b_y = b_x / (1.0 + tl.exp(-1.702 * b_x))
    tl.store(y + o_i, b_y.to(y.dtype.element_ty), mask=m_i)


@triton.jit
def _quick_gelu_bwd_kernel(
    x, dy, dx,  # [N] contiguous, dx may alias dy
    N,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < N
    b_x = tl.load(x + o_i, mask=m_i, other=0.0).to(ACC)
    b_dy = tl.load(dy + o_i, mask=m_i, other=0.0).to(ACC)
    b_s = 1.0 / (1.0 + tl.exp(-1.702 * b_x))
    b_dx = b_dy * (b_s + 1.702 * b_x * b_s * (1.0 - b_s))
    tl.store(dx + o_i, b_dx.to(dx.dtype.element_ty), mask=m_i)


def quick_gelu_fwd(x: torch.Tensor, out: torch.Tensor, config: tuple[int, int] | None = None) -> torch.Tensor:
    """``out = x * sigmoid(1.702 x)``; both contiguous, same shape and dtype (``out`` may be ``x``).
    ``config``: (elements per program, warps) instead of :func:`quick_gelu_config`'s (for the tuner)."""
    assert x.is_contiguous() and out.is_contiguous() and x.shape == out.shape
    n = x.numel()
    block, warps = config or quick_gelu_config(x)
    wrap_triton(_quick_gelu_fwd_kernel)[(cdiv(n, block),)](
        x, out, n, BLOCK=block, ACC=tl_dtype(acc_dtype(x.dtype)), num_warps=warps
    )
    return out


def quick_gelu_bwd(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   config: tuple[int, int] | None = None) -> torch.Tensor:
    """``dx = dy * d/dx[x * sigmoid(1.702 x)]``; all contiguous (``dx`` may be ``dy``)."""
    assert x.is_contiguous() and dy.is_contiguous() and dx.is_contiguous()
    n = x.numel()
    block, warps = config or quick_gelu_config(x)
    wrap_triton(_quick_gelu_bwd_kernel)[(cdiv(n, block),)](
        x, dy, dx, n, BLOCK=block, ACC=tl_dtype(acc_dtype(x.dtype)), num_warps=warps
    )
    return dx
