"""Triton kernels of xclip-fast (installed as ``xclip_fast.kernels``).

Only ``@triton.jit`` functions, their launchers and their launch plans live here; operator
registration, autograd, input checks and backend dispatch are in ``xclip_fast``.
"""

import torch
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every accumulator and statistic (log-sum-exp): fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return _TL[dtype]


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` where it applies: launches inside a ``triton_op`` that
    ``torch.compile`` traces become graph nodes, eager launches go straight to the kernel. Kernels of
    Triton's interpreter (``TRITON_INTERPRET=1``) launch as they are."""
    if type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return _torch_wrap_triton(kernel)
